"""The folder captioner: ``main()`` in-process on a real folder with the tiny model (loaded once
for the module), its captions compared with the API's for the same images and flags, and one
run as the command a user types."""
import os
import subprocess
import sys

import pytest

import caption_folder
import config
import engines as engine_mod
import jobs
import schema
from support import web
from support import images as pics
from support.worker import FAST as API_FAST
from support.worker import REPO, worker_env

FLAGS = ["--num-beams", "2", "--max-length", "8", "--min-length", "2"]


@pytest.fixture(scope="module")
def eng():
    cfg = config.Config.from_env({"BLIP_MODEL": "tiny-random", "BLIP_WARMUP": "0"})
    return engine_mod.load_engine(cfg)


def write(path, data: bytes) -> bytes:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return data


@pytest.fixture
def folder(tmp_path):
    """Nested folders, a stem collision, hidden and junk entries, two bad images, a text file."""
    root = tmp_path / "dataset"
    images = {
        "a.jpg": write(root / "a.jpg", pics.jpeg(seed=1)),
        "a.png": write(root / "a.png", pics.png(seed=2)),
        "sub/b.webp": write(root / "sub" / "b.webp", pics.image_bytes("WEBP", seed=3)),
        "sub/deeper/c.JPEG": write(root / "sub" / "deeper" / "c.JPEG", pics.jpeg(seed=4)),
    }
    write(root / "sub" / "truncated.jpg", pics.truncated_jpeg(seed=5))
    write(root / "sub" / "text.jpg", b"this is not a picture")
    write(root / ".cache" / "hidden.jpg", pics.jpeg(seed=6))
    write(root / ".hidden.jpg", pics.jpeg(seed=7))
    write(root / "__MACOSX" / "._a.jpg", b"resource fork")
    write(root / "notes.txt", b"keep me")
    return root, images


def run(eng, capsys, *argv) -> tuple[int, str, str]:
    code = caption_folder.main([str(a) for a in argv], engine=eng)
    out, err = capsys.readouterr()
    return code, out, err


def captions_in(root) -> dict[str, str]:
    return {str(p.relative_to(root)): p.read_text() for p in sorted(root.rglob("*.txt"))}


def test_captions_every_image_next_to_it_and_reports_bad_ones(eng, capsys, folder):
    root, _ = folder
    code, out, err = run(eng, capsys, root, *FLAGS)
    assert code == 1  # two images failed
    assert "captioned 4, skipped 0 (already captioned), failed 2" in out
    assert "failed: sub/truncated.jpg: not a readable image: truncated" in err
    assert "failed: sub/text.jpg: not an image" in err
    files = captions_in(root)
    assert sorted(files) == ["a.png.txt", "a.txt", "notes.txt", "sub/b.txt", "sub/deeper/c.txt"]
    assert files["notes.txt"] == "keep me"
    assert not [n for n in os.listdir(root) if n.endswith(".tmp")]


def test_same_captions_as_the_api_for_the_same_images_and_flags(eng, capsys, folder, tmp_path):
    root, images = folder
    run(eng, capsys, root, *FLAGS, "--num-captions", "2", "--prompt", "a picture of")
    cfg = config.Config.from_env({"BLIP_MODEL": "tiny-random", "WORK_DIR": str(tmp_path)})
    worker = jobs.Worker(cfg, eng)
    try:
        api = worker.run({"data_urls": [web.data_uri(b) for b in images.values()],
                          "num_captions": 2, "prompt": "a picture of", **API_FAST})
    finally:
        worker.close()
    expected = ["".join(f"{c}\n" for c in [e["caption"], *e["alternatives"]])
                for e in api["captions"]]
    files = captions_in(root)
    assert [files[n] for n in ("a.txt", "a.png.txt", "sub/b.txt", "sub/deeper/c.txt")] == expected


def test_a_second_run_skips_captioned_images_unless_overwrite(eng, capsys, folder):
    root, _ = folder
    run(eng, capsys, root, *FLAGS)
    (root / "a.txt").write_text("old caption\n")
    code, out, _ = run(eng, capsys, root, *FLAGS)
    assert "captioned 0, skipped 4 (already captioned), failed 2" in out and code == 1
    assert (root / "a.txt").read_text() == "old caption\n"
    run(eng, capsys, root, *FLAGS, "--overwrite")
    assert (root / "a.txt").read_text() != "old caption\n"


def test_images_go_through_the_engine_in_batches(eng, capsys, tmp_path, monkeypatch):
    for i in range(10):
        write(tmp_path / f"img{i:02d}.png", pics.png(seed=40 + i))
    sizes = []
    real = eng.generate_batch
    monkeypatch.setattr(eng, "generate_batch",
                        lambda pixels, *a: sizes.append(pixels.shape[0]) or real(pixels, *a))
    code, out, _ = run(eng, capsys, tmp_path, *FLAGS, "--batch-size", "4")
    assert code == 0 and "captioned 10," in out
    assert sizes == [4, 4, 2]


def test_flags_are_the_request_fields_with_the_api_defaults_and_bounds(eng, capsys, tmp_path):
    options = {a for action in caption_folder.parser()._actions for a in action.option_strings}
    for spec in schema.FIELDS:
        if spec.name not in caption_folder.NOT_FLAGS:
            assert caption_folder.flag(spec.name) in options, spec.name
    defaults = caption_folder.parse_options(caption_folder.parser().parse_args(["x"]),
                                            config.defaults())
    api = schema.parse_request({"data_url": "https://example.com/a.jpg"}, config.defaults())
    assert (defaults.generation, defaults.prompt, defaults.batch_size) == \
        (api.generation, api.prompt, api.batch_size)
    code, _, err = run(eng, capsys, tmp_path, "--num-beams", "0", "--min-length", "9",
                       "--max-length", "3")
    assert code == 2
    assert "invalid options: --num-beams: must be an integer from 1 to 10 (got 0)" in err
    assert "--min-length: must be at most --max-length" in err


def test_a_missing_folder_or_no_images(eng, capsys, tmp_path):
    code, _, err = run(eng, capsys, tmp_path / "nope")
    assert code == 2 and "not a folder" in err
    code, out, _ = run(eng, capsys, tmp_path)
    assert code == 0 and "no images found" in out


def test_the_command_line(tmp_path):
    write(tmp_path / "x" / "photo.jpg", pics.jpeg(seed=9))
    done = subprocess.run(
        [sys.executable, str(REPO / "src" / "caption_folder.py"), str(tmp_path),
         "--max-length", "6"], env=worker_env(BLIP_WARMUP="0"), cwd=tmp_path,
        capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "captioned 1, skipped 0 (already captioned), failed 0" in done.stdout
    assert "img/s" in done.stderr  # the progress bar's rate
    assert (tmp_path / "x" / "photo.txt").read_text().strip()
