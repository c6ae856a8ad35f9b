"""Talking to the endpoint: submitting and following one job over the runpod SDK, with back-off on
429s and network errors, and cancelling.

- Concurrency: ``--max-in-flight`` (default 32) jobs at once, each submitted and polled (every
  ``--poll-interval`` s) by its own thread with its own SDK session. A 429 from /run or /status
  waits ``Retry-After`` (else an exponential back-off) and carries on; network errors and 5xx
  answers are retried the same way.
"""
from __future__ import annotations

import random
import threading
import time
from email.utils import parsedate_to_datetime

from text import short

from .work import Job, Result

BACKOFF_MAX_S = 30.0
FINAL_STATES = ("COMPLETED", "FAILED", "CANCELLED", "TIMED_OUT")
LIVE_STATES = ("IN_QUEUE", "IN_PROGRESS")


class Fatal(Exception):
    """The endpoint refuses the run as a whole (bad key, unknown endpoint): stop, exit 2."""


def retry_after(response) -> float | None:
    """Seconds from a Retry-After header (seconds or an HTTP date), None when absent."""
    value = response.headers.get("Retry-After") if response is not None else None
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        return max(0.0, parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError):
        return None


def backoff(attempt: int) -> float:
    return min(BACKOFF_MAX_S, 0.5 * 2 ** attempt) * random.uniform(0.5, 1.0)


class Fleet:
    """Submits and polls jobs with the runpod SDK, one session per thread."""

    def __init__(self, endpoint_id: str, api_key: str, base_url: str, poll_s: float,
                 job_timeout: float, stop: threading.Event):
        self.endpoint_id = endpoint_id
        self._key = api_key
        self.base_url = base_url
        self.poll_s = poll_s
        self.job_timeout = job_timeout
        self.stop = stop
        self.moved = time.monotonic()  # the last change seen on any job of the run
        self.throttled = 0  # 429 answers seen (after the SDK's own retries)
        self.network_errors = 0
        self._local = threading.local()

    def endpoint(self):
        ep = getattr(self._local, "endpoint", None)
        if ep is None:
            import runpod
            ep = runpod.Endpoint(self.endpoint_id, api_key=self._key)
            ep.rp_client.endpoint_url_base = self.base_url
            self._local.endpoint = ep
        return ep

    def run(self, job: Job) -> Result:
        """Submit the job and follow it to a final state (or lose it, or stop)."""
        submitted = self._submit(job)
        if not isinstance(submitted, str):
            return submitted
        return self._follow(submitted)

    def _submit(self, job: Job) -> Result | str:
        import requests
        ep = self.endpoint()
        first_try, attempt = time.monotonic(), 0
        while True:
            if self.stop.is_set():
                return Result("stopped")
            try:
                rp_job = ep.run({"input": job.input})
                job_id = rp_job.job_id
                job.input = {}  # up to 10 MB of base64: not kept while the job runs
                if self.stop.is_set():
                    self.cancel(job_id)
                    return Result("stopped")
                return job_id
            except RuntimeError as exc:  # the SDK's 401
                raise Fatal(f"the endpoint refused RUNPOD_API_KEY ({short(str(exc), 200)}); "
                            "check the key") from None
            except requests.HTTPError as exc:
                code = exc.response.status_code if exc.response is not None else 0
                if code == 404:
                    raise Fatal(f"endpoint {self.endpoint_id!r} not found at {self.base_url} "
                                "(HTTP 404 on /run); check --endpoint") from None
                if code == 429:
                    self.throttled += 1
                    wait_s = retry_after(exc.response)
                    self.stop.wait(backoff(attempt) if wait_s is None else wait_s)
                    attempt += 1
                    continue
                if 400 <= code < 500 and code != 408:
                    text = short(exc.response.text if exc.response is not None else "", 200)
                    return Result("rejected", reason=f"the endpoint refused the job: HTTP "
                                                     f"{code} on /run ({text})")
                reason = f"HTTP {code} on /run"
            except (requests.RequestException, ValueError, KeyError, TypeError) as exc:
                reason = f"{type(exc).__name__} on /run"
            self.network_errors += 1
            if time.monotonic() - first_try > self.job_timeout:
                return Result("lost", reason=f"could not submit the job for "
                                             f"{self.job_timeout:g} s ({reason})")
            self.stop.wait(backoff(attempt))
            attempt += 1

    def _follow(self, job_id: str) -> Result:
        import requests
        ep = self.endpoint()
        last: tuple | None = None
        changed = time.monotonic()
        attempt = 0
        while True:
            if self.stop.wait(self.poll_s):
                return self._last_look(job_id)
            try:
                state = ep.rp_client.get(f"{self.endpoint_id}/status/{job_id}")
                attempt = 0
            except RuntimeError as exc:
                raise Fatal(f"the endpoint refused RUNPOD_API_KEY ({short(str(exc), 200)})"
                            ) from None
            except requests.HTTPError as exc:
                code = exc.response.status_code if exc.response is not None else 0
                if code == 404:
                    return Result("lost", reason="the endpoint no longer knows the job (status "
                                                 "not found: expired or lost)")
                if code == 429:
                    self.throttled += 1
                    wait_s = retry_after(exc.response)
                    self.stop.wait(backoff(attempt) if wait_s is None else wait_s)
                else:
                    self.network_errors += 1
                    self.stop.wait(backoff(attempt))
                attempt += 1
                state = None
            except requests.exceptions.RetryError:  # the SDK's own 429 retries ran out
                self.throttled += 1
                self.stop.wait(backoff(attempt))
                attempt += 1
                state = None
            except (requests.RequestException, ValueError):
                self.network_errors += 1
                self.stop.wait(backoff(attempt))
                attempt += 1
                state = None
            now = time.monotonic()
            if isinstance(state, dict):
                status = state.get("status")
                progress = state.get("output") if status == "IN_PROGRESS" else None
                sign = (status, progress if isinstance(progress, str) else None)
                if sign != last:
                    last, changed = sign, now
                    self.moved = now
                if status in FINAL_STATES:
                    return Result("state", state)
                if status not in LIVE_STATES:
                    return Result("lost", reason=f"the endpoint answered status "
                                                 f"{short(str(status), 40)}")
            since = changed if last and last[0] == "IN_PROGRESS" else max(changed, self.moved)
            if now - since > self.job_timeout:
                self.cancel(job_id)
                where = last[0] if last else "no answer"
                return Result("lost", reason=f"no progress for {self.job_timeout:g} s "
                                             f"({where}; --job-timeout)")

    def _last_look(self, job_id: str) -> Result:
        """Stopping: a job that has just finished is kept; any other is cancelled."""
        state = self._final_state(job_id)
        if state is None and self.cancel(job_id) in ("COMPLETED", "FAILED"):
            state = self._final_state(job_id)  # it finished as we cancelled it
        return Result("stopped") if state is None else Result("state", state)

    def _final_state(self, job_id: str) -> dict | None:
        """The job's /status answer if it is final; None otherwise or on any error."""
        try:
            state = self.endpoint().rp_client.get(f"{self.endpoint_id}/status/{job_id}",
                                                  timeout=5)
        except Exception:  # noqa: BLE001 - stopping: best effort
            return None
        if isinstance(state, dict) and state.get("status") in FINAL_STATES:
            return state
        return None

    def cancel(self, job_id: str) -> str | None:
        """Best effort (the job may already be finished or gone); the status it answers."""
        from runpod.endpoint.runner import Job as RpJob
        try:
            answer = RpJob(self.endpoint_id, job_id, self.endpoint().rp_client).cancel()
            return answer.get("status") if isinstance(answer, dict) else None
        except Exception:  # noqa: BLE001 - cancelling is a courtesy; never fatal
            return None
