"""The run: builds the jobs (inline files packed under the body limit), keeps
``--max-in-flight`` of them on the endpoint, and records each image's outcome exactly once.

Jobs (decisions):
- ``--images-per-job`` (default 256) caps every job: one full GPU batch on an 80 GB GPU, so the
  per-job overhead amortises while a resubmitted job re-runs at most 256 images, and a
  10,000-image dataset spreads over 40 jobs for the autoscaler. Inline jobs are also packed so
  the /run body, measured as the SDK sends it (``json.dumps`` of ``{"input": ...}``, default
  separators), stays at most ``--max-body-bytes`` (RunPod's 10,000,000). A file that does not
  fit alone gets a per-image error naming the limit and what to do.
"""
from __future__ import annotations

import argparse
import os
import re
import sys
from collections import deque
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Sequence

from config import Config
from text import human_size, printable, short

from .endpoint import Fleet
from .outcomes import answered_zips, classify, rows_from_output, split_reasons
from .outfiles import Existing, Output
from .packing import body_bytes, envelope_bytes, json_len, prepare_file
from .sources import presigned_url
from .work import Item, Job, Prepared, Result, Row

_SIGNED = re.compile(r"\?[^\s'\")]*X-Amz-[^\s'\")]*")  # presigned query strings in messages


# --- the run ---------------------------------------------------------------------------------

@dataclass
class Stats:
    images: int = 0  # to do in this run
    captioned: int = 0
    failed: int = 0
    failed_before: int = 0  # error lines kept from earlier runs (no --retry-failed)
    skipped: int = 0  # already in --out
    duplicates: int = 0
    jobs: int = 0
    resubmitted: int = 0  # images sent again
    body_bytes: int = 0  # all /run bodies, resubmissions included
    raw_bytes: int = 0  # inline files as they are on disk
    data_bytes: int = 0  # inline files as encoded (pre-resized or raw)
    preresized: int = 0
    gpu_s: float = 0.0
    seconds: float = 0.0
    client_cpu_s: float = 0.0  # the whole main(), imports of torch (pre-resizing) included
    loop_cpu_s: float = 0.0  # from the first job built to the summary
    throttled: int = 0
    interrupted: bool = False

    def text(self) -> str:
        rate = f", {self.done / self.seconds:.1f} images/s" if self.done and self.seconds else ""
        before = (f" (+{self.failed_before} failed in earlier runs, kept: --retry-failed "
                  "retries them)" if self.failed_before else "")
        dup = f", {self.duplicates} duplicates ignored" if self.duplicates else ""
        saved = self.raw_bytes - self.data_bytes
        pre = (f"; pre-resizing saved {human_size(saved)} ({self.preresized} images)"
               if self.preresized else "")
        return (f"captioned {self.captioned}, failed {self.failed}{before}, skipped "
                f"{self.skipped} (already in --out){dup} in {self.seconds:.1f}s{rate}; "
                f"{self.jobs} jobs, {human_size(self.body_bytes)} sent{pre}; GPU time "
                f"{self.gpu_s:.1f} s (sum of caption_s)"
                + (f"; {self.resubmitted} images resubmitted" if self.resubmitted else "")
                + ("; interrupted" if self.interrupted else ""))

    @property
    def done(self) -> int:
        return self.captioned + self.failed

    def as_dict(self) -> dict:
        d = dict(self.__dict__)
        d["images_per_s"] = self.done / self.seconds if self.seconds else 0.0
        return d


class Run:
    """Plans jobs, keeps ``max_in_flight`` of them on the endpoint, records their outcomes."""

    def __init__(self, args: argparse.Namespace, fields: dict, cfg: Config, items: list[Item],
                 output: Output, existing: Existing, fleet: Fleet, progress, s3=None):
        self.args = args
        self.fields = fields
        self.cfg = cfg
        self.output = output
        self.existing = existing
        self.fleet = fleet
        self.progress = progress
        self.s3 = s3
        self.stats = Stats()
        self.envelope = envelope_bytes(fields)
        self.attempts: dict[tuple[str, str], int] = {}
        self.queue: deque[tuple[Item, Future | None]] = deque()
        self.todo = iter(items)
        self.partial: list[tuple[Item, Prepared]] = []
        self.reported = 0
        threads = max(1, min(8, os.cpu_count() or 1))
        self.prep_pool = ThreadPoolExecutor(threads, thread_name_prefix="prepare")
        self.prep_ahead = 4 * threads
        self.job_pool = ThreadPoolExecutor(args.max_in_flight, thread_name_prefix="job")
        self.running: dict[Future, Job] = {}
        self.written = existing.done | existing.failed  # keys with a line (retried ones dropped)

    # -- building jobs (main thread) --

    def _prepare(self, item: Item) -> Future | None:
        if item.kind != "file":
            return None
        return self.prep_pool.submit(prepare_file, item, self.args.preresize,
                                     self.args.image_size, self.cfg, self.envelope,
                                     self.args.max_body_bytes)

    def _fill(self) -> None:
        ahead = sum(1 for _, f in self.queue if f is not None)
        room = self.prep_ahead + self.args.images_per_job
        while (ahead < self.prep_ahead and len(self.queue) < room
               and (item := next(self.todo, None)) is not None):
            future = self._prepare(item)
            self.queue.append((item, future))
            ahead += future is not None

    def _entry(self, item: Item) -> Prepared:
        if item.kind == "url":
            return Prepared(item.ref, json_len(item.ref))
        url = presigned_url(self.s3, item)
        return Prepared(url, json_len(url))

    def next_job(self) -> Job | None:
        """The next job when one is ready (full, or nothing more to come), else None."""
        self._fill()
        limit, per_job = self.args.max_body_bytes, self.args.images_per_job
        while self.queue:
            item, future = self.queue[0]
            if item.kind == "zip":
                if self.partial:
                    return self._cut()
                self.queue.popleft()
                return self._zip_job(item)
            if future is not None and not future.done():
                return None
            self.queue.popleft()
            self._fill()
            if item.kind == "bad":
                self._record([Row(item, item.source, item.image_path, error=item.ref)])
                continue
            prepared = future.result() if future is not None else self._entry(item)
            if prepared.error:
                self._record([Row(item, item.source, item.image_path, error=prepared.error)])
                continue
            sizes = [p.entry_bytes for _, p in self.partial] + [prepared.entry_bytes]
            if self.partial and body_bytes(self.envelope, sizes) > limit:
                job = self._cut()
                self.partial = [(item, prepared)]
                return job
            self.partial.append((item, prepared))
            if len(self.partial) >= per_job:
                return self._cut()
        return self._cut() if self.partial else None

    def _cut(self) -> Job:
        pairs, self.partial = self.partial, []
        urls = [p.entry for _, p in pairs]
        fields = {**self.fields, "data_urls": urls}
        labels = {}  # the worker's image_path: data_urls[i] for inline data, else the URL
        for i, (item, prepared) in enumerate(pairs):
            labels[f"data_urls[{i}]" if item.kind == "file" else printable(prepared.entry)] = item
        size = body_bytes(self.envelope, [p.entry_bytes for _, p in pairs])
        return Job([it for it, _ in pairs], fields, size, labels,
                   raw_bytes=sum(p.raw_bytes for _, p in pairs),
                   data_bytes=sum(p.data_bytes for _, p in pairs),
                   preresized=sum(p.preresized for _, p in pairs))

    def _zip_job(self, item: Item) -> Job:
        fields = {**self.fields, "data_url": item.ref}
        return Job([item], fields, json_len({"input": fields}), {printable(item.ref): item})

    def more(self) -> bool:
        return bool(self.queue or self.partial) or self._peek()

    def _peek(self) -> bool:
        item = next(self.todo, None)
        if item is None:
            return False
        self.queue.append((item, self._prepare(item)))
        return True

    # -- outcomes (main thread) --

    def _record(self, rows: Sequence[Row], settled: int | None = None) -> None:
        """Write the rows whose key has no line yet: the one check that no key is written twice,
        in this run or across runs, whichever branch made the rows. Every reason is cleaned of
        presigned query strings here (a RunPod 4xx body, a worker message can quote a URL).
        ``settled``: how many of the bar's items the rows settle (one a row; a zip counts as
        one item until its members are known)."""
        fresh = []
        for r in rows:
            if r.key not in self.written:
                self.written.add(r.key)
                r.error = self._clean(r.error) if r.error is not None else None
                fresh.append(r)
        settled = len(rows) if settled is None else settled
        if len(fresh) != settled and getattr(self.progress, "total", None) is not None:
            self.progress.total += len(fresh) - settled
        rows = self.output.write(fresh)
        for r in rows:
            if r.error is None:
                self.stats.captioned += 1
            else:
                self.stats.failed += 1
                self.reported += 1
                if self.reported <= 20:
                    self.progress.write(f"failed: {short(self._clean(r.image_path), 200)}: "
                                        f"{r.error}", file=sys.stderr)
                elif self.reported == 21:
                    self.progress.write("(more failures: see --out)", file=sys.stderr)
        self.progress.update(len(rows))
        self.progress.set_postfix(failed=self.stats.failed, refresh=False)

    def _clean(self, text: str) -> str:
        return _SIGNED.sub("?...", text)

    def _resubmit(self, items: Sequence[Item], reason: str) -> None:
        reason = self._clean(reason)
        again, given_up = [], []
        for item in items:
            n = self.attempts[item.key] = self.attempts.get(item.key, 1) + 1
            (again if n <= self.args.retries + 1 else given_up).append(item)
        if again:
            self.stats.resubmitted += len(again)
            self.progress.write(f"resubmitting {len(again)} images: {reason}", file=sys.stderr)
            for item in reversed(again):
                self.queue.appendleft((item, self._prepare(item)))
        if given_up:
            tries = self.args.retries + 1
            self._record([Row(it, it.source, it.image_path,
                              error=f"{reason} (after {tries} attempt{'s' * (tries > 1)})")
                          for it in given_up])

    def settle(self, job: Job, result: Result) -> None:
        if result.kind == "stopped":
            return
        if result.kind == "rejected":
            self._record([Row(it, it.source, it.image_path, error=result.reason)
                          for it in job.items])
            return
        if result.kind == "lost":
            self._resubmit(job.items, result.reason)
            return
        verdict, reason = classify(result.state)
        output = result.state.get("output")
        if isinstance(output, dict):
            timings = output.get("timings")
            if isinstance(timings, dict) and isinstance(timings.get("caption_s"), (int, float)):
                self.stats.gpu_s += float(timings["caption_s"])
        if verdict == "ok":
            rows, missing = rows_from_output(job, output, self.written)
            self._record(rows, settled=len(job.items) - len(missing))
            self.output.mark_complete(answered_zips(job, rows, missing))  # their block is flushed
            if missing:
                self._resubmit(missing, "the worker's answer did not mention these images")
        elif verdict == "retry":
            self._resubmit(job.items, reason)
        else:  # split on the raw message: labels are the URLs as sent (presigned); _record
            # cleans each piece
            mine = split_reasons(reason, list(job.labels)) if verdict == "all_failed" else {}
            by_item = {id(it): lab for lab, it in job.labels.items()}
            self._record([Row(it, it.source, it.image_path,
                              error=mine.get(by_item.get(id(it), ""), reason))
                          for it in job.items])

    # -- the loop --

    def loop(self) -> None:
        stop = self.fleet.stop
        quitting = False  # a second Ctrl-C: leave without waiting for the jobs in flight
        try:
            while True:
                while not stop.is_set() and len(self.running) < self.args.max_in_flight:
                    job = self.next_job()
                    if job is None:
                        break
                    self.stats.jobs += 1
                    self.stats.body_bytes += job.body_bytes
                    self.stats.raw_bytes += job.raw_bytes
                    self.stats.data_bytes += job.data_bytes
                    self.stats.preresized += job.preresized
                    self.running[self.job_pool.submit(self.fleet.run, job)] = job
                if not self.running and (stop.is_set() or not self.more()):
                    break
                waiting = list(self.running)
                if self.queue and self.queue[0][1] is not None and not stop.is_set():
                    waiting.append(self.queue[0][1])
                if not waiting:
                    continue
                done, _ = wait(waiting, timeout=0.5, return_when=FIRST_COMPLETED)
                for future in done:
                    job = self.running.pop(future, None)
                    if job is not None:
                        self.settle(job, future.result())  # Fatal propagates
        except KeyboardInterrupt:
            quitting = True
            raise
        finally:
            stop.set()
            for future, job in [] if quitting else list(self.running.items()):
                try:
                    result = future.result(timeout=30)
                except Exception:  # noqa: BLE001 - stopping; what finished is written
                    continue
                if result.kind == "state":  # finished as we stopped: keep it
                    try:
                        self.settle(job, result)
                    except Exception:  # noqa: BLE001 - stopping
                        pass
            self.job_pool.shutdown(wait=False, cancel_futures=True)
            self.prep_pool.shutdown(wait=False, cancel_futures=True)
