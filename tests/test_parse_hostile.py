"""Messy and hostile input: every file gives one result, no file takes the batch down, parsing is linear.

Every hostile file is generated here, under tmp_path. Timing assertions are relative (time per
character against a normal letter parsed in the same process, or the growth from n to 4n), never
fixed wall-clock limits, except generous sanity bounds.
"""

from __future__ import annotations

import concurrent.futures
import ctypes
import json
import multiprocessing
import os
import pickle
import random
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from imr_model import textsource
from imr_model.demo import write_demo_letters
from imr_model.letters import MAX_ITEMS, _parse_one, iter_letter_files, parse_file, parse_many, parse_text, walk_letter_folder
from imr_model.parse_pool import WorkerStartError, run_isolated
from imr_model.types import OVERTURNED, UPHELD, Letter, LetterError, clean_text
from tests.hostile_files import IS_ROOT, demo_letter_text, fpdf_bytes, hostile_files, letter_with_items

SHARED_PDFS = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "raw" / "ca-dwc-imr-letters" / "pdfs"
TARGET = f"{__name__}:misbehave"  # the workers import this module (the parent's sys.path is theirs)

pytestmark = pytest.mark.skipif(os.name != "posix", reason="isolated parsing needs POSIX processes")


# --------------------------------------------------------------------------- LetterError crosses processes


def test_letter_error_pickles_and_crosses_a_real_process_pool(tmp_path):
    err = LetterError("/x/a.pdf", "empty file (0 bytes)")
    back = pickle.loads(pickle.dumps(err))
    assert (type(back), back.source, back.reason, str(back)) == (LetterError, err.source, err.reason, str(err))
    empty = tmp_path / "empty.txt"
    empty.write_bytes(b"")
    with concurrent.futures.ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        returned = pool.submit(_parse_one, empty).result(timeout=120)
        raised = pool.submit(parse_file, empty).exception(timeout=120)
    for e in (returned, raised):
        assert isinstance(e, LetterError) and e.source == str(empty) and e.reason == "empty file (0 bytes)"


def test_cli_parse_with_default_workers_survives_one_bad_file(tmp_path):
    """The reported defect: 12 PDFs + 1 empty .txt under `imr parse` (--workers 0) gave BrokenProcessPool."""
    from imr_model.cli import main as cli_main

    folder = tmp_path / "in"
    write_demo_letters(folder, 12, seed=4, fmt="pdf")
    (folder / "empty.txt").write_bytes(b"")
    out = tmp_path / "items.jsonl"
    with pytest.raises(SystemExit) as done:
        cli_main(["parse", str(folder), "-o", str(out)])
    assert done.value.code == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len({r["letter_id"] for r in rows if "error" not in r}) == 12
    assert [r["source"] for r in rows if "error" in r] == [str(folder / "empty.txt")]


# --------------------------------------------------------------------------- the worker pool


def misbehave(item: str):
    """Worker target for the pool tests: each item names a way to (mis)behave."""
    kind, _, arg = item.partition(":")
    if kind == "ok":
        return arg
    if kind == "pid":
        return os.getpid()
    if kind == "sleep":
        time.sleep(float(arg))
        return item
    if kind == "segv":
        ctypes.string_at(0)  # a real invalid read
    if kind == "abort":
        os.abort()
    if kind == "hang":
        time.sleep(3600)
    if kind == "oom":
        return bytearray(1 << 40)  # beyond any RLIMIT_AS: MemoryError
    if kind == "exit":
        os._exit(int(arg))
    if kind == "raise":
        raise ValueError("secret letter text")
    if kind == "object":
        return {"not": "json", "x": {1, 2}}  # a set: not a JSON value
    raise AssertionError(item)


def _fail(item, reason):
    return ("failed", item, reason)


def test_pool_turns_crashes_hangs_and_oom_into_one_result_each_and_replaces_the_worker():
    items = ["ok:1", "segv", "ok:2", "abort", "ok:3", "hang", "ok:4", "oom", "ok:5", "exit:3", "raise", "ok:6"]
    start = time.monotonic()
    got = list(run_isolated(TARGET, items, _fail, workers=1, time_limit=2.0, memory_limit=1 << 30))
    elapsed = time.monotonic() - start
    assert [g if isinstance(g, str) else g[1] for g in got] == [i.partition(":")[2] if i.startswith("ok") else i for i in items]
    reasons = {g[1]: g[2] for g in got if isinstance(g, tuple)}
    assert reasons["segv"] == "parser process crashed (signal 11, SIGSEGV)"
    assert reasons["abort"] == "parser process crashed (signal 6, SIGABRT)"
    assert reasons["hang"] == "exceeded the 2 s parse time limit"
    assert reasons["oom"] == "exceeded the 1024 MB memory limit"
    assert reasons["exit:3"] == "parser process exited unexpectedly (exit code 3)"
    assert reasons["raise"] == "unexpected ValueError in the parser process"  # never the exception's text
    assert elapsed < 60  # sanity: the hang cost its 2 s budget, not an hour


def test_pool_keeps_input_order_with_several_workers_and_a_slow_first_item():
    items = ["sleep:1.0"] + [f"ok:{k}" for k in range(30)] + ["hang"] + [f"ok:{k}" for k in range(30, 40)]
    got = list(run_isolated(TARGET, items, _fail, workers=2, time_limit=1.5))
    assert got[0] == "sleep:1.0" and got[1:31] == [str(k) for k in range(30)] and got[32:] == [str(k) for k in range(30, 40)]
    assert got[31] == ("failed", "hang", "exceeded the 1.5 s parse time limit")


def test_pool_streams_with_bounded_lookahead_and_ends_its_workers_when_abandoned():
    taken = 0

    def items():
        nonlocal taken
        for k in range(100_000):
            taken += 1
            yield "pid" if k == 0 else f"ok:{k}"

    gen = run_isolated(TARGET, items(), _fail, workers=2, window=8)
    pid = next(gen)
    assert taken <= 8 + 1  # the window, plus the item waiting for a free worker
    for _ in range(50):
        next(gen)
        assert taken <= 51 + 8 + 1
    gen.close()
    with pytest.raises(ProcessLookupError):  # killed and reaped, not left running
        os.kill(pid, 0)


def test_pool_reports_a_worker_that_cannot_start():
    with pytest.raises(WorkerStartError, match="could not start: ModuleNotFoundError"):
        list(run_isolated("no_such_module_xyz:fn", ["x"], _fail))


def test_parse_many_time_limit_applies_to_real_letters(tmp_path):
    big = tmp_path / "big.txt"
    big.write_text(letter_with_items(90) + "filler line of a long letter\n" * 150_000)  # 4.4 MB: ~0.4 s
    small = tmp_path / "small.txt"
    small.write_text(demo_letter_text(5))  # ~1 ms
    results = list(parse_many([big, small], time_limit=0.1))
    assert isinstance(results[0], LetterError) and results[0].reason == "exceeded the 0.1 s parse time limit"
    assert isinstance(results[1], Letter)  # the next letter, in a fresh worker


def test_parse_many_in_process_opt_out(tmp_path):
    path = tmp_path / "a.txt"
    path.write_text(demo_letter_text(6))
    (tmp_path / "b.txt").write_bytes(b"")
    got = list(parse_many([path, tmp_path / "b.txt"], isolate=False))
    assert isinstance(got[0], Letter) and isinstance(got[1], LetterError)
    with pytest.raises(ValueError, match="workers must be 1"):
        list(parse_many([path], isolate=False, workers=2))


# --------------------------------------------------------------------------- errors say what is true


@pytest.fixture(scope="module")
def hostile_dir(tmp_path_factory) -> tuple[Path, dict[str, str]]:
    folder = tmp_path_factory.mktemp("hostile")
    return folder, hostile_files(folder)


def test_each_hostile_file_gives_the_right_error_in_process_or_isolated(hostile_dir):
    folder, expected = hostile_dir
    for name, reason in expected.items():
        if reason is None or name == "bomb.pdf":  # a letter; the bomb needs the worker's memory limit
            continue
        with pytest.raises(LetterError) as info:
            parse_file(folder / name)
        assert reason in info.value.reason, (name, info.value.reason)
        assert info.value.source == str(folder / name)
        assert "secret" not in str(info.value)
    for name in ("truncated.pdf", "bitflipped.pdf", "random.pdf", "image-only.pdf"):
        with pytest.raises(LetterError) as info:
            parse_file(folder / name)
        assert "encrypted" not in info.value.reason, name


def test_bitflipped_and_truncated_pdfs_never_claim_encryption(tmp_path):
    good = fpdf_bytes(demo_letter_text(8))
    rng = random.Random(11)
    path = tmp_path / "x.pdf"
    for trial in range(60):
        data = bytearray(good)
        if trial % 3 == 0:
            data = data[: rng.randrange(1, len(data))]
        else:
            for _ in range(rng.randrange(1, 30)):
                i = rng.randrange(len(data))
                data[i] ^= 1 << rng.randrange(8)
        path.write_bytes(bytes(data))
        try:
            parse_file(path)
        except LetterError as exc:
            assert "encrypted" not in exc.reason and "security" not in exc.reason, exc.reason


def test_utf16_text_without_bom_is_named_as_such(tmp_path):
    path = tmp_path / "a.txt"
    path.write_bytes(demo_letter_text(9).encode("utf-16-le"))
    with pytest.raises(LetterError, match="looks like UTF-16"):
        parse_file(path)


def test_trailing_junk_after_eof_still_parses(tmp_path, monkeypatch):
    text = demo_letter_text(10)
    good = fpdf_bytes(text)
    reference = parse_text(textsource.pdf_bytes_text(good, "ref"))
    junk = {"html": b"<p>This message was scanned.</p>\n" * 500, "random": random.Random(1).randbytes(50_000),
            "fake-eof": b"garbage startxref 99999 %%EOF\n" + b"\x00" * 5000 + b"%%EOF\n"}  # fmt: skip
    real_load = textsource._load_pdf_bytes

    def strict_load(pdfium_c, data):  # as PDFium does with real letters (xref streams): refuse any junk
        return real_load(pdfium_c, data) if data.rstrip() == good.rstrip() else (None, None, 3)

    for name, tail in junk.items():
        path = tmp_path / f"{name}.pdf"
        path.write_bytes(good + tail)
        for loader in (real_load, strict_load):
            monkeypatch.setattr(textsource, "_load_pdf_bytes", loader)
            letter = parse_file(path)
            assert [(i.request, i.decision) for i in letter.items] == [(i.request, i.decision) for i in reference.items], name


@pytest.mark.shared
@pytest.mark.skipif(not SHARED_PDFS.is_dir(), reason="../shared real letters not present")
def test_real_letter_with_trailing_junk_parses_like_the_original(tmp_path):
    """PDFium refuses a real letter (xref streams, incremental update) with 14 KB of junk appended."""
    src = sorted(SHARED_PDFS.glob("*.pdf"))[0]
    path = tmp_path / "junk.pdf"
    path.write_bytes(src.read_bytes() + b"<p>footer</p>\n" * 1000)  # under tmp_path only, deleted by pytest
    assert parse_file(path).items == parse_file(src).items


def test_lone_surrogates_in_text_are_replaced():
    text = demo_letter_text(12).replace("Decision rationale:", "Decision rationale: \ud800 \udfff", 1)
    letter = parse_text(text)
    blob = json.dumps([r for r in letter.item_records()], ensure_ascii=False)
    blob.encode("utf-8")  # would raise on a lone surrogate
    assert "\ufffd" in letter.items[0].rationale


def test_too_many_items_is_a_clear_error_and_fast():
    start = time.perf_counter()
    with pytest.raises(LetterError, match=rf"500 decisions found \(> {MAX_ITEMS}\); not a single IMR letter"):
        parse_text(letter_with_items(500))
    assert time.perf_counter() - start < 10  # sanity
    assert len(parse_text(letter_with_items(MAX_ITEMS)).items) == MAX_ITEMS


# --------------------------------------------------------------------------- every path gets a result


def test_every_kind_of_path_gives_exactly_one_result(tmp_path):
    folder = tmp_path / "f"
    folder.mkdir()
    (folder / "b.txt").write_text(demo_letter_text(13))
    (folder / "a.pdf").write_bytes(fpdf_bytes(demo_letter_text(14)))
    (folder / "notes.csv").write_text("a,b\n")  # an ordinary non-letter file: not read by a walk
    (folder / "sub").mkdir()
    (folder / "sub" / "c.txt").write_text(demo_letter_text(15))
    os.symlink(folder / "a.pdf", folder / "link-without-suffix")
    os.symlink(folder / "notes.csv", folder / "link-to-csv")
    os.symlink("..", folder / "sub" / "up")  # a loop if a walk followed it
    os.symlink("missing", folder / "dangling")
    os.mkfifo(folder / "fifo")
    (tmp_path / "empty").mkdir()
    inputs = [str(folder), str(tmp_path / "nothing-*.pdf"), str(tmp_path / "missing.txt"), str(tmp_path / "empty"),
              str(folder / "fifo"), str(folder / "notes.csv")]  # fmt: skip
    paths = iter_letter_files(inputs)
    names = [str(p.relative_to(tmp_path)) for p in paths]
    assert names == [
        "f/a.pdf", "f/b.txt", "f/dangling", "f/fifo", "f/link-without-suffix", "f/sub/c.txt", "f/sub/up",
        "nothing-*.pdf", "missing.txt", "empty", "f/notes.csv",
    ]  # fmt: skip
    results = list(parse_many(paths, workers=2))
    assert [r.source for r in results] == [str(p) for p in paths]
    reasons = {Path(r.source).name: r.reason for r in results if isinstance(r, LetterError)}
    assert {n for n, r in zip(names, results) if isinstance(r, Letter)} == {"f/a.pdf", "f/b.txt", "f/link-without-suffix", "f/sub/c.txt"}
    assert reasons["dangling"] == "dangling symlink (its target does not exist)"
    assert reasons["fifo"] == "is a FIFO (named pipe), not a letter file"
    assert reasons["up"].startswith("is a symlink to a folder")
    assert reasons["nothing-*.pdf"] == "pattern matched no files"
    assert reasons["missing.txt"] == "file not found"
    assert reasons["empty"] == "folder holds no .pdf or .txt letter files"
    assert "notes.csv" in reasons  # named explicitly: read, and reported as not a letter
    assert walk_letter_folder(folder) == walk_letter_folder(folder)  # deterministic


@pytest.mark.skipif(IS_ROOT, reason="root reads chmod 000 files")
def test_unreadable_file_is_reported(tmp_path):
    path = tmp_path / "a.txt"
    path.write_text(demo_letter_text(16))
    path.chmod(0)
    with pytest.raises(LetterError, match=r"cannot read file \(permission denied\)"):
        parse_file(path)


# --------------------------------------------------------------------------- linear time


def _best_time(fn, repeat: int = 3) -> float:
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def _parse_quietly(text: str) -> None:
    try:
        parse_text(text)
    except LetterError:
        pass


@pytest.fixture(scope="module")
def reference_seconds_per_char() -> float:
    text = "\n\n".join(demo_letter_text(s) for s in range(3))
    return _best_time(lambda: parse_text(text), 5) / len(text)


QUADRATIC = {  # each was quadratic before: name → text of size ~n
    "determined": lambda n: "has determined the request for x is " * (n // 36),
    "decision-then-spaces": lambda n: "IMR ISSUES, DECISIONS AND RATIONALES\nKnee MRI: Upheld" + " " * n + "x",
    "decision-alone-then-spaces": lambda n: "Knee MRI:\nUpheld" + " " * n + ".x",
    "header-spaces": lambda n: "Case Number" + " " * n + "x",
    "page-breaks-before-a-title": lambda n: "a\n" + "\f\n" * (n // 2) + "x:\nUpheld\n",
}


@pytest.mark.timeout(300)  # a quadratic regression at these sizes takes hours: fail, don't hang CI
@pytest.mark.parametrize("name", sorted(QUADRATIC))
def test_once_quadratic_inputs_are_linear(name):
    make = QUADRATIC[name]
    n = 100_000
    t1 = _best_time(lambda: _parse_quietly(make(n)))
    t4 = _best_time(lambda: _parse_quietly(make(4 * n)))
    assert t4 / max(t1, 1e-3) < 8, (name, t1, t4)  # linear: ~4; quadratic: 16


FRAGMENTS = [
    "Upheld", "Overturned", "Uphe1d", ":", ";", " ", "  ", "\n", "\n\n", "\f", "\t", ".", "x", "12/", "<<PAGE>>",
    "has determined the request for ", " is ", "not ", "medically necessary", "MAXIMUS Federal Services, Inc. ",
    "IMR ISSUES, DECISIONS AND RATIONALES", "CLINICAL CASE SUMMARY", "Case Number", "Date Assigned",
    "Certification(s)/Specialty:", "State(s) of Licensure:", "Citation Used:", "Rationale for the Decision:",
    "Claims Administrator guideline:", "MAXIMUS guideline:", "Decision rationale:", "1) Regarding the request for ",
    "set forth below", "Case Summary:", "Page 1 of 2", "x" * 3000, " " * 5000,
]  # fmt: skip


@pytest.mark.timeout(600)
@settings(max_examples=14, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(st.lists(st.sampled_from(FRAGMENTS), min_size=1, max_size=10), st.integers(20_000, 1_000_000))
@example(["has determined the request for ", "x", " is "], 1_000_000)  # the 1 MB text that hung
@example(["x", ":", " " * 5000, "Upheld", "\n"], 1_000_000)
@example(["\f", "\n", "x:", "\n", "Upheld", "\n"], 1_000_000)
def test_parse_time_per_character_is_bounded(reference_seconds_per_char, fragments, size):
    unit = "".join(fragments)
    text = (unit * (size // len(unit) + 1))[:size]
    bound = 100 * reference_seconds_per_char * len(text) + 0.05
    elapsed = _best_time(lambda: _parse_quietly(text), 1)
    if elapsed > bound:  # a busy machine: measure again before failing
        elapsed = _best_time(lambda: _parse_quietly(text), 2)
    assert elapsed <= bound, (fragments, len(text), elapsed, bound)


# --------------------------------------------------------------------------- the acceptance case


@pytest.fixture(scope="module")
def mixed_folder(hostile_dir) -> tuple[Path, dict[str, str | None]]:
    """Hostile files + demo letters (+ links to a few real letters when ../shared is present)."""
    folder, expected = hostile_dir
    expected = dict(expected)
    for p in write_demo_letters(folder / "demo", 6, seed=20, fmt="pdf") + write_demo_letters(folder / "demo", 6, seed=30):
        expected[str(p.relative_to(folder))] = None
    (folder / "demo" / "index.csv").write_text("not,a,letter\n")  # skipped by the walk
    if SHARED_PDFS.is_dir():
        (folder / "real").mkdir(exist_ok=True)
        for src in sorted(SHARED_PDFS.glob("*.pdf"))[:4]:
            link = folder / "real" / src.name
            if not link.exists():
                os.symlink(src, link)
            expected[f"real/{src.name}"] = None
    return folder, expected


def test_mixed_folder_with_default_settings_gives_one_result_per_entry_in_order(mixed_folder):
    folder, expected = mixed_folder
    start = time.monotonic()
    paths = iter_letter_files([str(folder)])
    results = list(parse_many(paths))  # the DEFAULT settings: isolated, one worker, 60 s / 1.5 GB
    elapsed = time.monotonic() - start
    names = [clean_text(str(p.relative_to(folder))) for p in paths]  # as output rows spell them
    assert sorted(names) == sorted(expected)  # every entry once, nothing else
    assert [r.source for r in results] == [str(p) for p in paths]  # in order
    for name, result in zip(names, results):
        reason = expected[name]
        if reason is None:
            assert isinstance(result, Letter) and result.items, (name, getattr(result, "reason", None))
            assert all(i.decision in (UPHELD, OVERTURNED) for i in result.items)
            json.dumps(result.item_records(), ensure_ascii=False).encode("utf-8")  # no lone surrogates
        else:
            assert isinstance(result, LetterError) and reason in result.reason, (name, getattr(result, "reason", result))
    assert elapsed < 300  # sanity: the bomb, the 2,000 pages and the quadratic strings cost seconds


_RLIMIT_SCRIPT = r"""
import json, resource, sys, time
resource.setrlimit(resource.RLIMIT_AS, (4 << 30, 4 << 30))
from imr_model.letters import iter_letter_files, parse_many
start = time.monotonic()
paths = iter_letter_files([sys.argv[1]])
results = list(parse_many(paths))
print(json.dumps({"entries": len(paths), "results": len(results), "errors": sum(hasattr(r, "reason") for r in results),
                  "seconds": time.monotonic() - start,
                  "children_maxrss_kb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss,
                  "self_maxrss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}))
"""


def test_mixed_folder_under_a_4gb_address_space_limit_keeps_peak_rss_under_2gb(mixed_folder):
    folder, expected = mixed_folder
    proc = subprocess.run([sys.executable, "-c", _RLIMIT_SCRIPT, str(folder)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["entries"] == report["results"] == len(expected)
    assert report["errors"] == sum(r is not None for r in expected.values())
    assert report["children_maxrss_kb"] < 2 << 20 and report["self_maxrss_kb"] < 2 << 20, report


def test_a_folder_tree_1500_levels_deep_is_walked_without_recursion(tmp_path):
    deep = tmp_path / "deep"
    levels = [str(deep)]
    for _ in range(1500):  # os.makedirs (and shutil.rmtree, pytest's clean-up) recurse per level
        levels.append(levels[-1] + "/d")
    for d in levels:
        os.mkdir(d)
    bottom = Path(levels[-1])
    (bottom / "letter.txt").write_text(demo_letter_text(6), encoding="utf-8")
    try:
        found = iter_letter_files([deep])
        assert found == [bottom / "letter.txt"]
        (result,) = list(parse_many(found))
        assert isinstance(result, Letter)
        (named,) = iter_letter_files([deep / "d"])  # a subfolder named explicitly: one entry, the letter
        assert named.name == "letter.txt"
    finally:
        (bottom / "letter.txt").unlink()
        for d in reversed(levels):
            os.rmdir(d)


def test_worker_results_are_json_never_pickle():
    """The parent decodes worker output as JSON: a worker that read a hostile file could send a crafted
    pickle, and unpickling it would run code in the parent. A non-JSON result is a failure, not an object."""
    got = list(run_isolated(TARGET, ["ok:1", "object", "ok:2"], _fail, workers=1, time_limit=30.0, memory_limit=1 << 30))
    assert got[0] == "1" and got[2] == "2"
    assert got[1] == ("failed", "object", "unexpected TypeError in the parser process")
