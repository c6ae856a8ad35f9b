"""RunPod entry point: thin glue between runpod and ``jobs.Worker``.

    python src/handler.py                          # runs ./test_input.json and exits
    python src/handler.py --test_input '{"input": {...}}'
    python src/handler.py --rp_serve_api --rp_api_port 8000   # local /run, /runsync, /status
    (on RunPod the same command takes jobs from the endpoint's queue)

``main()`` validates the configuration and loads the model before any job is taken: a bad
setting or missing weights print one clear message and exit non-zero. The handler is async and
hands each job to a thread, so RunPod (``concurrency_modifier``: ``jobs.concurrent_jobs``) can
run several jobs at once and their images share GPU batches. Nothing loads at import.
``setup`` returns the one ``Service`` (the worker, its job threads, the job limit) and the module
holds it in ``service``: ``handler`` and ``concurrency_modifier``, RunPod's entry, serve it.
"""
from __future__ import annotations

import asyncio
import logging
import os
import sys
from concurrent.futures import ThreadPoolExecutor

from config import Config, ConfigError

log = logging.getLogger("blip.handler")


class Service:
    """One loaded worker as RunPod sees it: the ``jobs.Worker``, the thread pool its jobs run on
    and how many jobs it takes at once. ``setup`` makes it; ``handler`` and
    ``concurrency_modifier`` serve the one it made."""

    def __init__(self, worker, executor: ThreadPoolExecutor, max_jobs: int):
        self.worker = worker  # jobs.Worker
        self.executor = executor
        self.max_jobs = max_jobs

    async def handler(self, job: dict) -> dict:
        """Caption one job. Returns the output dict or ``{"error": ...}``; never raises."""
        job_id = str(job.get("id", "local")) if isinstance(job, dict) else "local"
        job_input = job.get("input") if isinstance(job, dict) else None
        loop = asyncio.get_running_loop()
        running = loop.run_in_executor(self.executor, self.worker.run, job_input, job_id,
                                       _progress_reporter(job))
        try:
            return await running
        except asyncio.CancelledError:  # RunPod cancelled or timed out the job: stop its work too
            self.worker.cancel(job_id)
            raise

    def concurrency_modifier(self, current: int) -> int:
        """How many jobs RunPod may hand this worker at once (MAX_CONCURRENT_JOBS)."""
        return self.max_jobs

    def close(self) -> None:
        """Stop the worker, then wait for the job threads."""
        self.worker.close()
        self.executor.shutdown(wait=True)


service: Service | None = None  # set by setup(); what handler() and concurrency_modifier() serve


async def handler(job: dict) -> dict:
    """RunPod's handler: the job goes to the service ``setup`` made; never raises."""
    if service is None:
        return {"error": "the worker is not initialised: start it with `python src/handler.py`"}
    return await service.handler(job)


def concurrency_modifier(current: int) -> int:
    """RunPod's concurrency modifier: the service's job limit (1 before ``setup``)."""
    return 1 if service is None else service.concurrency_modifier(current)


def _progress_reporter(job: dict):
    on_runpod = bool(os.environ.get("RUNPOD_WEBHOOK_POST_OUTPUT"))

    def report(done: int, total: int | None) -> None:
        images = "image" if done == 1 else "images"
        text = f"captioned {done}/{total} images" if total else f"captioned {done} {images} so far"
        if on_runpod:
            import runpod
            runpod.serverless.progress_update(job, text)
        else:
            log.debug("job %s: %s", job.get("id"), text)

    return report


def setup(cfg: Config) -> Service:
    """Load the model, start the worker and its job threads, and hold the service that
    ``handler`` serves (also used by tests)."""
    global service
    import engines
    import jobs
    eng = engines.load_engine(cfg)
    max_jobs = jobs.concurrent_jobs(cfg.max_concurrent_jobs, eng.max_batch_size)
    executor = jobs.start_threads(ThreadPoolExecutor(max_jobs, thread_name_prefix="job"),
                                  max_jobs)
    service = Service(jobs.Worker(cfg, eng), executor, max_jobs)
    log.info("ready: model %s, engine %s, device %s, %s, up to %d concurrent jobs (%s)",
             eng.model_id, eng.name, eng.device, describe_checks(eng), max_jobs,
             "MAX_CONCURRENT_JOBS" if cfg.max_concurrent_jobs else
             f"auto: batch limit {eng.max_batch_size}, kept within "
             f"{jobs.AUTO_JOBS_MIN}-{jobs.AUTO_JOBS_MAX}")
    return service


def describe_checks(eng) -> str:
    """The decoder in use and what the start-up self-check found, for the ready line."""
    decoder = f"decoder {eng.decoder}" if hasattr(eng, "decoder") else "its own decoder"
    check = eng.self_check.text if eng.self_check else "self-check off (BLIP_SELF_CHECK=0)"
    return f"{decoder}, {check}"


class _RunPodLogHandler(logging.Handler):
    """Send the worker's log records through runpod's logger (RunPod's log format)."""

    def __init__(self):
        super().__init__()
        from runpod import RunPodLogger
        self.rp = RunPodLogger()

    def emit(self, record: logging.LogRecord) -> None:
        level = {"WARNING": "warn", "CRITICAL": "error"}.get(record.levelname,
                                                            record.levelname.lower())
        try:
            getattr(self.rp, level, self.rp.info)(self.format(record))
        except Exception:  # noqa: BLE001 - logging must never break a job
            self.handleError(record)


def configure_logging(level: str = "INFO") -> None:
    root = logging.getLogger("blip")
    if not any(isinstance(h, _RunPodLogHandler) for h in root.handlers):
        root.addHandler(_RunPodLogHandler())
    root.setLevel(level)
    root.propagate = False


def main() -> int:
    try:
        cfg = Config.from_env()
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    # runpod logs at DEBUG by default, which echoes whole jobs (megabytes of base64) into the
    # logs: follow BLIP_LOG_LEVEL (INFO) unless RUNPOD_LOG_LEVEL / --rp_log_level say otherwise.
    # Set before runpod is imported: its logger reads the variable once.
    os.environ.setdefault("RUNPOD_LOG_LEVEL", {"WARNING": "WARN"}.get(cfg.log_level,
                                                                     cfg.log_level))
    configure_logging(cfg.log_level)
    import modeling
    try:
        setup(cfg)
    except (modeling.ModelLoadError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    import runpod
    runpod.serverless.start({"handler": handler, "concurrency_modifier": concurrency_modifier})
    return 0


if __name__ == "__main__":
    sys.exit(main())
