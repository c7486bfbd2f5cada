"""Cost growth: each pipeline stage at 1k and 10k synthetic letters (100k behind --max), and how its cost grows.

    python bench/scale.py                          # 1,000 and 10,000 letters
    python bench/scale.py --sizes 1000             # one size (no exponent)
    python bench/scale.py --max 100000             # 1k, 10k and 100k
    python bench/scale.py --stages parse_txt,build --sizes 1000,10000

Stages (each in its own subprocess, so its peak RSS is its own; the CLI stages run `imr` as a grandchild):

* ``parse_pdf`` / ``parse_txt``: ``imr parse DIR -o items.jsonl`` on the PDF / text letters (isolated workers).
* ``build``: ``imr data build items.jsonl -o ds`` on the items ``parse_txt`` wrote (grouped splits, three views,
  near-duplicate detection, Arrow files): the build alone, without parsing again.
* ``embed``: one forward pass over every item: the probe recipe's ``IMRClassifier.window_vectors`` on the
  ``rationale`` view (MiniLM, sentence windows), windows made from the texts first (timed).
* ``finetune``: ONE epoch of the ``finetune`` recipe's optimizer steps (``finetune._Trainer``) on 70% of the
  letters (windows and trainer set up on all of them, timed). If the first steps project the epoch beyond
  ``--finetune-budget`` seconds (default 1800), only ``--finetune-sample`` seconds of steps are run and the
  epoch is extrapolated from their mean step time (setup measured in full); the results say so.
* ``score``: ``imr score DIR -o scores.jsonl --device cpu`` on the text letters with a model trained once on 100
  of them (`--model-kind`: ``minilm`` = configs/default.yaml, 1 epoch; ``tiny`` = configs/tiny.yaml).

Per stage: wall time, CPU time (user + system of the stage process and every process it waited for:
``getrusage`` SELF + CHILDREN) and peak RSS: of the largest single process (the stage process's VmHWM, its
children's ``ru_maxrss``), and the peak of the whole process tree's summed RSS and anonymous RSS, sampled from
/proc every 0.2 s (file pages of memory-mapped Arrow files count in RSS, not in the anonymous part). Between two sizes the growth exponent is
k = log(t_b / t_a) / log(n_b / n_a) (1 = linear; fixed start-up costs push it below 1) and the RSS ratio
rss_b / rss_a. The table is printed with Rich and everything goes to bench/results/scale-<date>.json.

Letters come from the demo generator (`imr_model.demo`: letter i of seed 0 is the same at any size), written
once into ``--workdir`` and reused by later runs: text files as `imr data demo` writes them; PDFs rendered
with `demo.render_pdf` (fpdf2), ``--unique-pdfs`` of them (default 1,000; fpdf2 needs ~0.2-0.5 s per letter on
this machine), hard-linked under distinct names up to each size. Parsing one PDF does not depend on any other
file, so parse cost per file is what a set of distinct PDFs would cost. Other processes may share the CPUs:
the results record the load average before and after every stage.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import shutil
import subprocess
import sys
import threading
import time
from datetime import date
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
STAGES = ("parse_pdf", "parse_txt", "build", "embed", "finetune", "score")
CLI_STAGES = ("parse_pdf", "parse_txt", "build", "score")
FLAT_MEMORY = ("parse_pdf", "parse_txt", "build", "score")  # stages that stream: RSS should not grow with n
LINEAR_K, FLAT_RSS = 1.1, 1.25  # thresholds the issue sets: k above this is superlinear; RSS ratio above this grows
TRAIN_LETTERS = 100  # letters the scoring model is trained on (once per --model-kind)
PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


# --------------------------------------------------------------------------- measuring one stage


def _cpu_seconds() -> float:
    s, c = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return s.ru_utime + s.ru_stime + c.ru_utime + c.ru_stime


class TreeRss:
    """Peak summed RSS of a process and all its descendants, sampled from /proc (Linux; 0 elsewhere).

    `peak` counts every resident page (as `ru_maxrss` does), `peak_anon` only anonymous memory (RssAnon: not the
    page cache of memory-mapped files, e.g. the Arrow files a `DatasetDict` maps, which the kernel can drop)."""

    def __init__(self, root: int, interval: float = 0.2):
        self.root, self.interval, self.peak, self.peak_anon = root, interval, 0, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> "TreeRss":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.is_set():
            total, anon = self.sample()
            self.peak, self.peak_anon = max(self.peak, total), max(self.peak_anon, anon)
            self._stop.wait(self.interval)

    def sample(self) -> tuple[int, int]:
        parent: dict[int, int] = {}
        for entry in os.scandir("/proc") if os.path.isdir("/proc") else ():
            if entry.name.isdigit():
                try:
                    with open(f"/proc/{entry.name}/stat", "rb") as fh:
                        parent[int(entry.name)] = int(fh.read().rsplit(b")", 1)[1].split()[1])
                except (OSError, ValueError, IndexError):
                    continue
        tree, frontier = {self.root}, [self.root]
        children: dict[int, list[int]] = {}
        for pid, ppid in parent.items():
            children.setdefault(ppid, []).append(pid)
        while frontier:
            for child in children.get(frontier.pop(), ()):
                if child not in tree:
                    tree.add(child)
                    frontier.append(child)
        total = anon = 0
        for pid in tree:
            try:
                with open(f"/proc/{pid}/status", "rb") as fh:
                    fields = dict(line.split(b":", 1) for line in fh.read().splitlines() if b":" in line)
                total += int(fields[b"VmRSS"].split()[0]) * 1024
                anon += int(fields[b"RssAnon"].split()[0]) * 1024
            except (OSError, ValueError, IndexError, KeyError):
                continue
        return total, anon


def _own_peak_mb() -> float:
    """This process's peak RSS since it exec'd (VmHWM). `ru_maxrss` of RUSAGE_SELF would not do: Linux carries it
    over fork and exec, so a stage process would report the bench parent's RSS (torch imported) as its own."""
    try:
        with open("/proc/self/status", "rb") as fh:
            for line in fh:
                if line.startswith(b"VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def measure(work) -> dict:
    """Run `work()` (returns a dict of counts) and add wall, CPU and peak RSS of this process and its children."""
    with TreeRss(os.getpid()) as tree:
        start, cpu = time.perf_counter(), _cpu_seconds()
        extra = work() or {}
        wall, cpu = time.perf_counter() - start, _cpu_seconds() - cpu
    own = _own_peak_mb()
    kids = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    result = {"wall_s": round(wall, 2), "cpu_s": round(cpu, 2), "peak_rss_mb": round(max(own, kids), 1),
              "self_peak_rss_mb": round(own, 1), "children_peak_rss_mb": round(kids, 1),
              "tree_peak_rss_mb": round(tree.peak / 2**20, 1), "tree_peak_anon_mb": round(tree.peak_anon / 2**20, 1)}  # fmt: skip
    for key in ("wall_s", "cpu_s"):  # a stage that measured part of its work and extrapolated the rest
        if key in extra:
            result[f"measured_{key}"] = result[key]
            result[key] = round(extra.pop(key), 2)
    return {**result, **extra}


def imr(*args: str) -> list[str]:
    script = Path(sys.executable).with_name("imr")
    return [str(script), *args] if script.is_file() else [sys.executable, "-c", "import sys; from imr_model.cli "
                                                         "import main; main(sys.argv[1:])", *args]  # fmt: skip


def run_cli(cmd: list[str]) -> dict:
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd[:3])} ... failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return {"stderr_tail": proc.stderr.strip().splitlines()[-1][-300:] if proc.stderr.strip() else ""}


def _count_lines(path: Path) -> int:
    with path.open("rb") as fh:
        return sum(1 for _ in fh)


def stage_main(args) -> dict:
    """One stage at one size, in this (fresh) process."""
    work, sets = Path(args.workdir), Path(args.workdir) / "sets" / str(args.n)
    out = work / "out" / str(args.n)
    out.mkdir(parents=True, exist_ok=True)
    items = out / "items.jsonl"
    if args.stage in ("parse_pdf", "parse_txt"):
        kind = args.stage.split("_")[1]
        target = items if kind == "txt" else out / "items-pdf.jsonl"

        def work_fn():
            info = run_cli(imr("parse", str(sets / kind), "-o", str(target), "--workers", str(args.workers)))
            return {**info, "items": _count_lines(target)}
        return measure(work_fn)
    if args.stage == "build":
        if not items.is_file():
            raise SystemExit(f"{items} missing: run stage parse_txt at n={args.n} first")
        shutil.rmtree(out / "ds", ignore_errors=True)
        return measure(lambda: {**run_cli(imr("data", "build", str(items), "-o", str(out / "ds"))),
                                "items": _count_lines(items)})  # fmt: skip
    if args.stage == "score":
        for stale in out.glob("scores.jsonl*"):
            stale.unlink()
        model = (work / f"model-{args.model_kind}.path").read_text().strip()
        return measure(lambda: {**run_cli(imr("score", str(sets / "txt"), "-o", str(out / "scores.jsonl"), "--model",
                                              model, "--device", "cpu")), "items": _count_lines(out / "scores.jsonl")})  # fmt: skip
    if args.stage == "embed":
        return measure(lambda: embed(args, items))
    if args.stage == "finetune":
        return measure(lambda: finetune(args, items))
    raise SystemExit(f"unknown stage {args.stage}")


def _records(items: Path) -> list[dict]:
    if not items.is_file():
        raise SystemExit(f"{items} missing: run stage parse_txt at this size first")
    with items.open(encoding="utf-8") as fh:
        return [r for r in map(json.loads, fh) if not r.get("error")]


def _classifier(kind: str):
    import torch

    from imr_model.config import load_config
    from imr_model.modeling import IMRClassifier
    from imr_model.taxonomy import LABELS

    cfg = load_config("default" if kind == "minilm" else "tiny", ["train.device=cpu"])
    torch.set_num_threads(cfg.train.threads or torch.get_num_threads())
    torch.manual_seed(cfg.seed)
    # the TF-IDF term is an item-level term after pooling: neither window_vectors nor a fine-tuning step reads it
    clf = IMRClassifier.build(cfg.model.model_copy(update={"guideline_tfidf": False}), list(LABELS), device="cpu")
    return cfg, clf


def embed(args, items: Path) -> dict:
    from imr_model.views import text_view

    records = _records(items)
    cfg, clf = _classifier(args.model_kind)
    texts = [text_view(r, cfg.model.text_view) for r in records]
    windows = clf.make_windows(texts)
    attended, mean = clf.window_vectors(windows, cfg.train.eval_batch_size)
    return {"items": len(texts), "windows": len(windows), "device": str(clf.device),
            "vectors_mb": round((attended.numel() + mean.numel()) * 4 / 2**20, 1)}  # fmt: skip


def finetune(args, items: Path) -> dict:
    from imr_model.finetune import _Trainer, length_batches, resolve_pos_weight
    from imr_model.splits import records_to_split
    from imr_model.taxonomy import LABELS

    records = _records(items)
    letters = sorted({r["letter_id"] for r in records})
    train_letters = {x for i, x in enumerate(letters) if i % 10 < 7}  # 70%, as the default split's train share
    cfg, clf = _classifier(args.model_kind)
    start, cpu = time.perf_counter(), _cpu_seconds()
    train = records_to_split([r for r in records if r["letter_id"] in train_letters], cfg.model.text_view, list(LABELS))
    windows = clf.make_windows(train.texts)
    trainer = _Trainer(cfg.train, cfg.seed, clf, windows, train, resolve_pos_weight(cfg.train.pos_weight, train.y))
    batches = length_batches(trainer.lengths, cfg.train.batch_size, trainer.generator)
    clf.net.train()
    setup_s, setup_cpu = time.perf_counter() - start, _cpu_seconds() - cpu
    done, step_start, step_cpu = 0, time.perf_counter(), _cpu_seconds()
    extrapolated = False
    for items_ in batches:
        trainer._step(items_)
        done += 1
        spent = time.perf_counter() - step_start
        projected = setup_s + spent / done * len(batches)
        if done >= 5 and projected > args.finetune_budget and spent >= args.finetune_sample:
            extrapolated = done < len(batches)
            break
    steps_s, steps_cpu = time.perf_counter() - step_start, _cpu_seconds() - step_cpu
    scale = len(batches) / done
    return {"items": len(train), "windows": len(windows), "steps": len(batches), "steps_measured": done,
            "extrapolated": extrapolated, "setup_s": round(setup_s, 2), "step_s_mean": round(steps_s / done, 4),
            "wall_s": setup_s + steps_s * scale, "cpu_s": setup_cpu + steps_cpu * scale}  # fmt: skip


# --------------------------------------------------------------------------- letters and the scoring model


def _render(job: tuple[int, int, str]) -> None:
    from imr_model.demo import iter_letters, render_pdf

    start, n, folder = job
    for letter in iter_letters(n, seed=0, start=start):
        path = Path(folder) / f"{letter.name}.pdf"
        if not path.is_file():
            tmp = path.with_suffix(".pdf.tmp")
            render_pdf(letter.text, tmp)
            os.replace(tmp, path)


def prepare_letters(work: Path, sizes: list[int], unique_pdfs: int, workers: int) -> dict:
    """Text letters 0..max-1 and `unique_pdfs` PDFs, written once; per size a folder of hard links."""
    from concurrent.futures import ProcessPoolExecutor

    from imr_model.demo import iter_letters

    top = max(sizes)
    txt, pdf = work / "letters-txt", work / "letters-pdf"
    txt.mkdir(parents=True, exist_ok=True)
    pdf.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    names = []
    for letter in iter_letters(top, seed=0):
        path = txt / f"{letter.name}.txt"
        if not path.is_file():
            path.write_text(letter.text, encoding="utf-8")
        names.append(letter.name)
    txt_s = time.perf_counter() - start
    n_pdf = min(unique_pdfs, top)
    missing = [i for i, name in enumerate(names[:n_pdf]) if not (pdf / f"{name}.pdf").is_file()]
    start = time.perf_counter()
    if missing:
        print(f"rendering {len(missing)} PDFs (fpdf2) ...", file=sys.stderr, flush=True)
        chunk = 50
        jobs = [(i, min(chunk, n_pdf - i), str(pdf)) for i in range(min(missing), n_pdf, chunk)]
        with ProcessPoolExecutor(max_workers=workers) as pool:
            list(pool.map(_render, jobs))
    pdf_s = time.perf_counter() - start
    for n in sizes:
        for kind, src in (("txt", txt), ("pdf", pdf)):
            folder = work / "sets" / str(n) / kind
            if folder.is_dir() and sum(1 for _ in folder.iterdir()) == n:
                continue
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir(parents=True)
            for i, name in enumerate(names[:n]):
                source = src / f"{names[i % n_pdf] if kind == 'pdf' else name}.{kind}"
                os.link(source, folder / f"{name}.{kind}")
    return {"text_letters": top, "unique_pdfs": n_pdf, "write_txt_s": round(txt_s, 1), "render_pdf_s": round(pdf_s, 1)}


def prepare_model(work: Path, kind: str) -> str:
    """A model trained once on the first TRAIN_LETTERS text letters (what `imr score` loads)."""
    marker = work / f"model-{kind}.path"
    if marker.is_file() and Path(marker.read_text().strip(), "config.json").is_file():
        return marker.read_text().strip()
    data = work / "train-letters"
    shutil.rmtree(data, ignore_errors=True)
    data.mkdir(parents=True)
    for path in sorted((work / "letters-txt").glob("*.txt"))[:TRAIN_LETTERS]:
        os.link(path, data / path.name)
    out = work / f"models-{kind}"
    json_out = work / f"train-{kind}.json"
    print(f"training the scoring model ({kind}, {TRAIN_LETTERS} letters, 1 epoch) ...", file=sys.stderr, flush=True)
    run_cli(imr("train", "--config", "default" if kind == "minilm" else "tiny", "--data", str(data), "--set",
                "train.epochs=1", "--set", "mlflow.enabled=false", "--set", f"output_dir={out}", "--device", "cpu",
                "--json", str(json_out), "--quiet"))  # fmt: skip
    model_dir = json.loads(json_out.read_text())["model_dir"]
    marker.write_text(model_dir)
    return model_dir


# --------------------------------------------------------------------------- the run


def _load() -> list[float]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


def growth(results: dict, sizes: list[int]) -> dict:
    """k (wall and CPU) and the RSS ratio of every stage between consecutive sizes."""
    out: dict = {}
    for a, b in zip(sizes, sizes[1:]):
        for stage in STAGES:
            ra, rb = results.get(str(a), {}).get(stage), results.get(str(b), {}).get(stage)
            if not ra or not rb:
                continue
            ratio = math.log(b / a)
            out.setdefault(f"{a}->{b}", {})[stage] = {
                "k_wall": round(math.log(rb["wall_s"] / ra["wall_s"]) / ratio, 3),
                "k_cpu": round(math.log(rb["cpu_s"] / ra["cpu_s"]) / ratio, 3),
                "rss_ratio": round(rb["peak_rss_mb"] / ra["peak_rss_mb"], 3),
                "tree_rss_ratio": round(rb["tree_peak_rss_mb"] / ra["tree_peak_rss_mb"], 3) if ra["tree_peak_rss_mb"] else None,
                "anon_ratio": (round(rb["tree_peak_anon_mb"] / ra["tree_peak_anon_mb"], 3)
                               if ra.get("tree_peak_anon_mb") and rb.get("tree_peak_anon_mb") else None),
            }  # fmt: skip
    return out


def flags(grow: dict) -> list[str]:
    """What breaks the issue's rules: k > 1.1 anywhere; RSS ratio > 1.25 for the streaming stages."""
    found = []
    for span, stages in grow.items():
        for stage, g in stages.items():
            if g["k_cpu"] > LINEAR_K:
                found.append(f"{stage} {span}: CPU time grows as n^{g['k_cpu']:.2f} (k > {LINEAR_K})")
            if stage in FLAT_MEMORY and g["rss_ratio"] > FLAT_RSS:
                found.append(f"{stage} {span}: peak RSS x{g['rss_ratio']:.2f} (> {FLAT_RSS})")
    return found


def print_table(report: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    sizes = report["sizes"]
    table = Table(title=f"imr-model cost growth, {report['model_kind']} model ({report['date']}, "
                        f"{report['machine']['cpus']} CPUs, shared machine)")  # fmt: skip
    table.add_column("stage")
    for n in sizes:
        table.add_column(f"n={n:,}\nwall / CPU s", justify="right")
        table.add_column("peak RSS\nMB", justify="right")
    spans = list(report["growth"])
    for span in spans:
        table.add_column(f"k {span}\nwall / CPU", justify="right")
        table.add_column("RSS\nratio", justify="right")
    for stage in report["stages"]:
        row = [stage]
        for n in sizes:
            r = report["results"].get(str(n), {}).get(stage)
            mark = "*" if r and r.get("extrapolated") else ""
            row += [f"{r['wall_s']:.1f} / {r['cpu_s']:.1f}{mark}", f"{r['peak_rss_mb']:.0f}"] if r else ["-", "-"]
        for span in spans:
            g = report["growth"][span].get(stage)
            row += [f"{g['k_wall']:.2f} / {g['k_cpu']:.2f}", f"{g['rss_ratio']:.2f}"] if g else ["-", "-"]
        table.add_row(*row)
    console = Console(width=max(100, 24 + 26 * len(sizes) + 24 * len(spans)))
    console.print(table)
    if any(r.get("extrapolated") for res in report["results"].values() for r in res.values()):
        console.print("* fine-tuning epoch extrapolated from the measured steps (see steps_measured in the JSON)")
    for line in report["flags"] or ["no stage above k = 1.1 (CPU) or, for the streaming stages, RSS ratio 1.25"]:
        console.print(line)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="1000,10000", help="letter counts, comma-separated")
    parser.add_argument("--max", type=int, default=10000, help="largest size to run; --max 100000 adds 100,000")
    parser.add_argument("--stages", default=",".join(STAGES))
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/imr-scale"), help="letters and outputs (kept)")
    parser.add_argument("--model-kind", choices=("minilm", "tiny"), default="minilm")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="parse workers")
    parser.add_argument("--unique-pdfs", type=int, default=1000)
    parser.add_argument("--finetune-budget", type=float, default=1800.0, help="seconds; beyond it, extrapolate")
    parser.add_argument("--finetune-sample", type=float, default=300.0, help="seconds of steps measured then")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--stage", help=argparse.SUPPRESS)  # internal: run one stage
    parser.add_argument("--n", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.stage:
        print(json.dumps(stage_main(args)))
        return {}
    sizes = sorted({int(s) for s in args.sizes.split(",") if s.strip()} | ({100000} if args.max >= 100000 else set()))
    sizes = [n for n in sizes if n <= args.max]
    stages = [s for s in STAGES if s in args.stages.split(",")]
    import torch

    from imr_model import __version__
    from imr_model.devices import describe, resolve_device

    device = describe(resolve_device("cpu"))
    print(f"device: {device['device']} ({device['precision']}); torch {torch.__version__}, {os.cpu_count()} CPUs",
          file=sys.stderr)  # fmt: skip
    work = args.workdir
    work.mkdir(parents=True, exist_ok=True)
    report = {"date": date.today().isoformat(), "sizes": sizes, "stages": stages, "model_kind": args.model_kind,
              "device": device, "machine": {"cpus": os.cpu_count(), "torch": torch.__version__,
                                            "imr_model": __version__, "load_start": _load(),
                                            "note": "shared machine: other jobs used the same CPUs during the run"},
              "setup": prepare_letters(work, sizes, args.unique_pdfs, args.workers), "results": {}}  # fmt: skip
    if "score" in stages:
        report["setup"]["score_model"] = prepare_model(work, args.model_kind)
    for n in sizes:
        for stage in stages:
            if stage == "build" and "parse_txt" not in stages and not (work / "out" / str(n) / "items.jsonl").is_file():
                raise SystemExit("stage build reads the items of parse_txt: include parse_txt")
            cmd = [sys.executable, __file__, "--stage", stage, "--n", str(n), "--workdir", str(work), "--model-kind",
                   args.model_kind, "--workers", str(args.workers), "--finetune-budget", str(args.finetune_budget),
                   "--finetune-sample", str(args.finetune_sample)]  # fmt: skip
            print(f"[{n:,} letters] {stage} ...", file=sys.stderr, flush=True)
            load_before = _load()
            proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
            if proc.returncode != 0:
                raise SystemExit(f"stage {stage} at n={n} failed:\n{proc.stderr[-3000:]}")
            result = json.loads(proc.stdout.strip().splitlines()[-1])
            result.update(load_before=load_before, load_after=_load())
            report["results"].setdefault(str(n), {})[stage] = result
            print(f"    {result['wall_s']:.1f} s wall, {result['cpu_s']:.1f} s CPU, {result['peak_rss_mb']:.0f} MB",
                  file=sys.stderr, flush=True)  # fmt: skip
    report["machine"]["load_end"] = _load()
    report["growth"] = growth(report["results"], sizes)
    report["flags"] = flags(report["growth"])
    print_table(report)
    suffix = "" if args.model_kind == "minilm" else f"-{args.model_kind}"
    out = args.out or REPO / "bench" / "results" / f"scale-{report['date']}{suffix}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2), encoding="utf-8")
    print(f"results → {out}", file=sys.stderr)
    return report


if __name__ == "__main__":
    main()
