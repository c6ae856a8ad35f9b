"""A load mix: jobs of every shape with exact expectations, sent from concurrent clients.

Pool images are named by seed and captioned alone once (``MixJob.problems`` compares every
caption with its image's own). ``LoadMix`` draws the jobs, ``pool_captions`` captions the pool,
``run_load`` and ``load_beside_failures`` send them, ``load_problems`` and ``slowed`` judge the
results.
"""
from __future__ import annotations

import random
import threading
import time
from typing import Callable, Iterable

from support.checks import outcome_problems
from support.images import jpeg, png, truncated_jpeg
from support.web import LocalServer, body, data_uri, drip
from support.zips import JUNK_NAMES, Entry, make_zip, symlink_entry

POOL_SIZE = 40


def pool_image(seed: int) -> bytes:
    """Pool image ``seed``: a small JPEG (even seeds) or PNG (odd seeds), distinct per seed."""
    return jpeg(seed) if seed % 2 == 0 else png(seed)


# (member/file bytes, expected error start) for the bad members and sources a mix contains
BAD_FILES = {
    "truncated": (lambda: truncated_jpeg(7), "not a readable image: truncated or corrupt JPEG"),
    "text": (lambda: b"this is not a picture", "not an image or a zip: the content is not"),
    "empty": (lambda: b"", "the file is empty (0 bytes); check that the source holds the image"),
}
BAD_MEMBERS = {
    **BAD_FILES,
    "symlink": (None, "symbolic link in the zip: links are not followed"),
    "nested": (lambda: make_zip([("a.png", png(1))]), "a zip inside the zip is not opened"),
}
GPU_FAILED = "the GPU failed while captioning"


class MixJob:
    """One job of a load mix and exactly what it must answer.

    ``expect``: {image_path: pool seed (captioned as that image is alone) or the start of its
    error}, in output order; ``skipped``: zip members skipped; ``fails``: the start of the job's
    error when the whole job must fail."""

    def __init__(self, name: str, job_input: dict, expect: dict[str, "int | str"],
                 skipped: int = 0, fails: "str | None" = None):
        self.name, self.input, self.expect = name, job_input, expect
        self.skipped, self.fails = skipped, fails

    @property
    def images(self) -> int:
        """Images this job must caption."""
        return 0 if self.fails else sum(isinstance(v, int) for v in self.expect.values())

    def problems(self, out: dict, captions: dict[int, str]) -> list[str]:
        """Where ``out`` (``Worker.run``'s shape) differs from what this job must answer;
        [] when exactly right. ``captions``: each pool image's caption alone."""
        if self.fails is not None:
            if str(out.get("error", "")).startswith(self.fails):
                return []
            return [f"{self.name}: expected the job to fail with {self.fails!r}..., got "
                    f"{str(out)[:300]}"]
        if "error" in out:
            return [f"{self.name}: the job failed: {str(out['error'])[:300]}"]
        problems = outcome_problems(out, {path: None if isinstance(v, int) else v
                                          for path, v in self.expect.items()})
        want = [(path, captions[v]) for path, v in self.expect.items() if isinstance(v, int)]
        got = [(c["image_path"], c["caption"]) for c in out.get("captions", [])]
        if not problems and got != want:
            problems.append("captions differ from each image's own caption: "
                            + "; ".join(f"#{i}: got {g!r}, expected {w!r}"
                                        for i, (g, w) in enumerate(zip(got, want)) if g != w))
        if out.get("skipped", 0) != self.skipped:
            problems.append(f"skipped {out.get('skipped', 0)}, expected {self.skipped}")
        return [f"{self.name}: {p}" for p in problems]


class LoadMix:
    """Jobs of mixed shapes against ``server`` (a LocalServer), drawn deterministically from
    ``seed``, each with its exact expected answer (``MixJob``):

    - ``url`` / ``inline``: one pool image by URL or as a data: URI;
    - ``list``: 2-6 pool images, by URL or inline, half the time with one bad source (a 404, or
      an inline truncated / text / empty file);
    - ``zip``: 5-50 pool images in folders, by URL or inline, with 0-3 bad members (truncated,
      text named .jpg, empty, symlink, nested zip) and 0-2 junk files (skipped), sometimes with
      a job ``batch_size``;
    - ``zip_list``: such a zip among two pool images (member paths prefixed by the zip's label);
    - ``fail``: every download fails (404s, plus a slow drip when ``drip`` is set, which lasts
      until the worker's DOWNLOAD_DEADLINE_S): the job fails with "no image could be captioned";
    - ``poison`` (only with ``poison``, the worker's BLIP_INJECT_CUDA_ERROR_PROMPT): the
      simulated CUDA failure; the job fails asking for a new worker. It uses num_beams=1, so it
      never shares a GPU batch with the others (images in a batch whose device failed fail
      with it, as they would on a real GPU).

    Pool images are ``pool_image(seed)`` for seeds below ``pool``; ``pool_captions`` captions
    each alone, and every caption of every job must equal its image's.
    """

    KINDS = (("url", 25), ("inline", 15), ("list", 20), ("zip", 22), ("zip_list", 10),
             ("fail", 6), ("poison", 2))

    def __init__(self, server: LocalServer, params: dict, seed: int = 0, prefix: str = "mix",
                 pool: int = POOL_SIZE, drip: bool = False, poison: "str | None" = None):
        self.server, self.params, self.prefix, self.pool = server, dict(params), prefix, pool
        self.rng = random.Random(seed)
        self.drip, self.poison = drip, poison
        self.made = 0
        self.pool_urls = {s: server.route(f"/{prefix}/pool/{s}.{'jpg' if s % 2 == 0 else 'png'}",
                                          body(pool_image(s))) for s in range(pool)}
        self.pool_uris = {s: data_uri(pool_image(s)) for s in range(pool)}

    def jobs(self, count: int, kinds: "Iterable[str] | None" = None) -> list[MixJob]:
        """``count`` jobs drawn from ``kinds`` (default: all) with the mix's weights."""
        allowed = set(kinds or (k for k, _ in self.KINDS)) - ({"poison"} if not self.poison
                                                                else set())
        names = [k for k, _ in self.KINDS if k in allowed]
        weights = [w for k, w in self.KINDS if k in allowed]
        return [getattr(self, f"_{self.rng.choices(names, weights)[0]}")() for _ in range(count)]

    # -- pieces --

    def _job(self, kind: str, job_input: dict, expect: dict, skipped: int = 0,
             fails: "str | None" = None) -> MixJob:
        self.made += 1
        return MixJob(f"{self.prefix}-{self.made}-{kind}", {**job_input, **self.params}, expect,
                      skipped, fails)

    def _unique(self, what: str, ext: str = "") -> str:
        return f"/{self.prefix}/{what}/{self.made}-{self.rng.randrange(10 ** 9)}{ext}"

    def _pool_source(self, seed: int, label: str) -> tuple[str, str]:
        """(source, image_path) of a pool image, by URL (60%) or inline labelled ``label``."""
        if self.rng.random() < 0.6:
            return self.pool_urls[seed], self.pool_urls[seed]
        return self.pool_uris[seed], label

    def _bad_source(self, label: str) -> tuple[str, str, str]:
        """(source, image_path, expected error) of a source that cannot be captioned."""
        kind = self.rng.choice(["404", *sorted(BAD_FILES)])
        if kind == "404":  # unknown paths answer 404
            url = self.server.url(self._unique("gone", ".jpg"))
            return url, url, "the server answered HTTP 404 Not Found"
        make, error = BAD_FILES[kind]
        return data_uri(make()), label, error

    def _zip_file(self) -> tuple[bytes, dict[str, "int | str"], int]:
        """A zip of 5-50 pool images (most jobs small), maybe with bad members and junk:
        (bytes, {member: seed or error} sorted by path, members skipped)."""
        members: dict[str, int | str] = {}
        entries: list[Entry] = []
        for j in range(5 + int(45 * self.rng.random() ** 2)):
            seed = self.rng.randrange(self.pool)
            name = f"d{j % 3}/img{j:02d}.{'jpg' if seed % 2 == 0 else 'png'}"
            entries.append((name, pool_image(seed)))
            members[name] = seed
        for j in range(self.rng.choice((0, 0, 1, 2, 3))):
            kind = self.rng.choice(sorted(BAD_MEMBERS))
            make, error = BAD_MEMBERS[kind]
            name = f"d{j % 3}/bad{j}-{kind}.jpg"
            entries.append(symlink_entry(name) if make is None else (name, make()))
            members[name] = error
        junk = self.rng.sample(JUNK_NAMES, self.rng.choice((0, 0, 1, 2)))
        entries += [(name, b"junk") for name in junk]
        self.rng.shuffle(entries)
        return make_zip(entries), dict(sorted(members.items())), len(junk)

    def _zip_source(self, data: bytes, label: str) -> tuple[str, str]:
        """(source, label) of a zip: served by URL or inline (then labelled ``label``)."""
        if self.rng.random() < 0.5:
            return data_uri(data, "application/zip"), label
        url = self.server.route(self._unique("zip", ".zip"), body(data, "application/zip"))
        return url, url

    # -- kinds --

    def _url(self) -> MixJob:
        seed = self.rng.randrange(self.pool)
        return self._job("url", {"data_url": self.pool_urls[seed]}, {self.pool_urls[seed]: seed})

    def _inline(self) -> MixJob:
        seed = self.rng.randrange(self.pool)
        return self._job("inline", {"data_url": self.pool_uris[seed]}, {"data_url": seed})

    def _list(self) -> MixJob:
        seeds: list[int | None] = list(self.rng.sample(range(self.pool), self.rng.randint(2, 6)))
        if self.rng.random() < 0.5:
            seeds.insert(self.rng.randrange(len(seeds) + 1), None)  # the bad one
        sources, expect = [], {}
        for i, seed in enumerate(seeds):
            if seed is None:
                source, label, outcome = self._bad_source(f"data_urls[{i}]")
            else:
                (source, label), outcome = self._pool_source(seed, f"data_urls[{i}]"), seed
            sources.append(source)
            expect[label] = outcome
        return self._job("list", {"data_urls": sources}, expect)

    def _zip(self) -> MixJob:
        data, members, skipped = self._zip_file()
        source, _ = self._zip_source(data, "data_url")
        extra = {"batch_size": self.rng.randint(1, 8)} if self.rng.random() < 0.3 else {}
        return self._job("zip", {"data_url": source, **extra}, members, skipped)

    def _zip_list(self) -> MixJob:
        data, members, skipped = self._zip_file()
        where = self.rng.randrange(3)
        seeds = self.rng.sample(range(self.pool), 2)
        sources, expect = [], {}
        for i in range(3):
            if i == where:
                source, label = self._zip_source(data, f"data_urls[{i}]")
                expect.update({f"{label}/{name}": v for name, v in members.items()})
            else:
                seed = seeds.pop()
                source, label = self._pool_source(seed, f"data_urls[{i}]")
                expect[label] = seed
            sources.append(source)
        return self._job("zip_list", {"data_urls": sources}, expect, skipped)

    def _fail(self) -> MixJob:
        urls = [self.server.url(self._unique("gone", ".jpg"))
                for _ in range(self.rng.randint(1, 3))]
        if self.drip:
            urls.append(self.server.route(self._unique("drip", ".jpg"),
                                          drip(b"\xff\xd8\xff" + bytes(400), interval=0.25)))
        return self._job("fail", {"data_urls": urls}, {}, fails="no image could be captioned (")

    def _poison(self) -> MixJob:
        seed = self.rng.randrange(self.pool)
        job = self._job("poison", {"data_url": self.pool_urls[seed]}, {}, fails=GPU_FAILED)
        job.input.update(prompt=self.poison, num_beams=1)
        return job


def pool_captions(run: Callable[[dict], dict], params: dict, pool: int = POOL_SIZE
                  ) -> dict[int, str]:
    """{seed: caption} of each pool image captioned alone by ``run`` (a job input -> output)."""
    return {s: run({"data_url": data_uri(pool_image(s)), **params})["captions"][0]["caption"]
            for s in range(pool)}


def run_load(run: Callable[[dict], dict], jobs: list[MixJob], clients: int
             ) -> list[tuple[MixJob, dict, float]]:
    """Send ``jobs`` from ``clients`` concurrent clients (client k sends jobs k, k+clients, ...
    one after another) through ``run`` (a job input -> output); (job, output, seconds) each."""
    from concurrent.futures import ThreadPoolExecutor

    def client(k: int) -> list[tuple[MixJob, dict, float]]:
        done = []
        for job in jobs[k::clients]:
            start = time.monotonic()
            out = run(job.input)
            done.append((job, out, time.monotonic() - start))
        return done

    with ThreadPoolExecutor(clients) as pool:
        return [row for rows in pool.map(client, range(clients)) for row in rows]


def load_beside_failures(run: Callable[[dict], dict], mix: LoadMix, jobs: list[MixJob],
                         clients: int, failing_clients: int):
    """Send ``jobs`` from ``clients`` clients alone, then again while ``failing_clients`` more
    clients send, back to back, ``mix`` jobs whose every download fails (a slow drip among
    them when the mix has ``drip``): (alone, beside, failed) results, as ``run_load``'s."""
    from concurrent.futures import ThreadPoolExecutor
    alone = run_load(run, jobs, clients)
    stop, failed = threading.Event(), []

    def keep_failing() -> None:
        while not stop.is_set():
            job = mix.jobs(1, kinds=("fail",))[0]
            failed.append((job, run(job.input), 0.0))

    with ThreadPoolExecutor(failing_clients) as pool:
        running = [pool.submit(keep_failing) for _ in range(failing_clients)]
        time.sleep(0.2)  # the failing jobs are under way
        try:
            beside = run_load(run, jobs, clients)
        finally:
            stop.set()
        for future in running:
            future.result()
    return alone, beside, failed


def slowed(alone: list, beside: list, by: float) -> list[tuple[str, float, float]]:
    """The jobs (name, seconds alone, seconds beside) that took more than ``by`` seconds longer
    in ``beside`` than in ``alone`` (the same jobs from the same clients, as
    ``load_beside_failures`` returns them)."""
    assert [job for job, _, _ in alone] == [job for job, _, _ in beside]
    return [(job.name, round(a, 2), round(b, 2))
            for (job, _, a), (_, _, b) in zip(alone, beside) if b > a + by]


def load_problems(results: list[tuple[MixJob, dict, float]], captions: dict[int, str]
                  ) -> list[str]:
    """Every way the answers of a load differ from what the jobs must answer ([] = none)."""
    return [p for job, out, _ in results for p in job.problems(out, captions)]
