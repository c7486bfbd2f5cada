"""Parse IMR Final Determination Letters (PDF or text) into typed `Letter` / `Item` records.

Three layouts are recognised:

* ``2016``: header block (Case Number, dates, Priority), reviewer credentials, CLINICAL CASE SUMMARY,
  then "IMR ISSUES, DECISIONS AND RATIONALES" with one block per item::

      <request title, may wrap over lines>: Upheld            (or the decision on its own line)
      Claims Administrator guideline: ...
      MAXIMUS guideline: ...
      Decision rationale: ...

* ``2015``: the same item blocks without the header block (plain text, sometimes double-spaced).
* ``2013``: "MAXIMUS Federal Services, Inc. has determined the request for X is (not) medically
  necessary and appropriate", with "Medical Treatment Guideline Schedule (MTUS) Citation Used" and
  "Rationale for the Decision" sections per item (see `letters_2013.py`).

An item's title runs back from its decision line to the previous paragraph break (blank line, page
break, section heading or field label), like the reference parse of these letters.

Every regular expression here runs in time linear in its input, whatever the input: no two
adjacent quantifiers can share characters (``\s*,?\s*`` is written ``\s*(?:,\s*)?``), lazy
``.*?`` never precedes an anchor it must scan for, and matching is done line by line on lines that
`normalize_text` has already stripped. tests/test_parse_hostile.py holds the time per character.
"""

from __future__ import annotations

import glob
import os
import re
import stat
from pathlib import Path
from typing import Iterable, Iterator

from imr_model import parse_pool
from imr_model.letters_2013 import parse_items_2013
from imr_model.textsource import LETTER_SUFFIXES, PAGE_BREAK, normalize_text, read_letter_text
from imr_model.types import OVERTURNED, UPHELD, Item, Letter, LetterError, clean_text

MAX_ITEMS = 100  # letters hold up to ~25 items; more means the text is not a letter
PARSE_TIME_LIMIT = parse_pool.DEFAULT_TIME_LIMIT  # s per letter in `parse_many` (a real one takes ~5 ms)
PARSE_MEMORY_LIMIT = parse_pool.DEFAULT_MEMORY_LIMIT  # bytes of address space per parse worker

# OCR-tolerant decision words: Upheld / Uphold / Upheid, Overturned / Overtumed / 0verturned.
_UPHELD = r"U\s?p\s?h[eo][l1i]d"
_OVERTURNED = r"[O0]\s?v\s?e\s?r\s?t\s?u\s?(?:r\s?n|m)\s?e\s?d"
_DECISION = rf"(?P<decision>{_UPHELD}|{_OVERTURNED})"
# The title runs to the line's last ':'/';' (nothing after it may hold one), so `.*?` tries each
# colon once and each try scans only up to the next colon: linear.
DECISION_LINE = re.compile(rf"^(?P<title>.*?)[:;]\s*{_DECISION}\s*(?:\.\s*)?$", re.I)
DECISION_ALONE = re.compile(rf"^\s*{_DECISION}\s*(?:\.\s*)?$", re.I)
_FIELD = {
    "claims_admin_guideline": r"Claims\s+Administrators?\s+guidelines?\s*[:;]",
    "maximus_guideline": r"MAXIMUS\s+guidelines?\s*[:;]",
    "rationale": r"Decision\s+rationale\s*[:;]",
}
_FIELD_RE = re.compile("|".join(f"(?P<{k}>{v})" for k, v in _FIELD.items()), re.I)
_FIELD_START = re.compile(r"^\s*(?:" + "|".join(_FIELD.values()) + ")", re.I)
ISSUES_HEADING = re.compile(r"IMR\s+ISSUES\s*(?:,\s*)?DECISIONS\s+AND\s+RATIONALES", re.I)
SUMMARY_HEADING = re.compile(r"CLINICAL\s+CASE\s+SUMMARY", re.I)
_SET_FORTH = re.compile(r"set\s+forth\s+below\s*(?::\s*)?$", re.I)
_SUMMARY_LEAD = re.compile(
    r"^\s*The\s+expert\s+reviewer\s+developed\s+the\s+following\s+clinical\s+case\s+summary\s+based\s+on\s+"
    r"a\s+review\s+of\s+the\s+case\s+file\s*,\s*including\s+all\s+medical\s+records\s*:?",
    re.I,
)
_DATE = r"(\d{1,2})\s*[/-]\s*(\d{1,2})\s*[/-]\s*(\d{2,4})"
_COLON = r"\s*(?::\s*)?"  # an optional colon between spaces; `\s*:?\s*` backtracks quadratically
_HEADER_FIELDS = {
    "case_number": rf"Case\s+(?:Number|No\.?){_COLON}(CM\s?\d{{2}}\s?-\s?\d{{5,8}})",
    "date_assigned": rf"Date\s+Assigned{_COLON}{_DATE}",
    "date_of_injury": rf"Date\s+of\s+Injury{_COLON}{_DATE}",
    "decision_date": rf"Decision\s+Date{_COLON}{_DATE}",
    "ur_denial_date": rf"(?:UR\s+Denial\s+Date|Date\s+of\s+UR\s+Decision){_COLON}{_DATE}",
    "priority": rf"Priority{_COLON}(Standard|Expedited|Urgent)",
}

_HEADER_PATTERNS = {key: re.compile(pattern, re.I) for key, pattern in _HEADER_FIELDS.items()}


def normalize_ws(text: str) -> str:
    return " ".join(text.split())  # str.split() splits on the same Unicode whitespace as \\s, and faster


def _decision_word(word: str) -> str:
    return OVERTURNED if word.strip().lower().lstrip("0o").startswith("v") else UPHELD


def _iso(m: re.Match) -> str | None:
    month, day, year = (int(g) for g in m.groups()[-3:])
    if year < 100:
        year += 2000
    if not (1 <= month <= 12 and 1 <= day <= 31):
        return None
    return f"{year:04d}-{month:02d}-{day:02d}"


# --------------------------------------------------------------------------- public API


def parse_text(text: str, *, source: str = "<text>", letter_id: str | None = None) -> Letter:
    """Parse a letter's text. Raises `LetterError` when the text is not an IMR letter or holds no items."""
    if not isinstance(text, str):
        raise TypeError(f"parse_text expects str, got {type(text).__name__}")
    text = clean_text(text)
    lines = normalize_text(text).split("\n")
    letter_id = letter_id or (Path(source).stem if source != "<text>" else "text")
    header = _parse_header(lines)
    items, layout = _parse_items_2015(lines), None
    if items:
        layout = "2016" if header.get("case_number") or header.get("decision_date") else "2015"
    else:
        items = parse_items_2013(lines)
        layout = "2013" if items else None
    if not items:
        if ISSUES_HEADING.search(text) or SUMMARY_HEADING.search(text):
            raise LetterError(source, "IMR letter with no disputed items (no 'Title: Upheld/Overturned' decisions found)")
        raise LetterError(
            source,
            "not an IMR Final Determination Letter (no 'IMR ISSUES, DECISIONS AND RATIONALES' items "
            "and no 'has determined the request for ...' decisions)",
        )
    if len(items) > MAX_ITEMS:
        raise LetterError(source, f"{len(items)} decisions found (> {MAX_ITEMS}); not a single IMR letter")
    warnings = tuple(f"item {it.index}: no decision rationale found" for it in items if not it.rationale)
    return Letter(
        letter_id=letter_id,
        source=source,
        layout=layout,
        items=tuple(items),
        case_summary=_case_summary(lines),
        warnings=warnings,
        **header,
    )


def parse_file(path: str | Path) -> Letter:
    """Read and parse one PDF or text letter, in this process. Raises `LetterError` naming the file.

    For untrusted files use `parse_many`, which bounds the time and memory one file can take.
    """
    path = Path(path)
    text = read_letter_text(path)
    return parse_text(text, source=str(path), letter_id=path.stem)


def iter_letter_files(inputs: Iterable[str | Path]) -> list[Path]:
    """Expand files, folders and glob patterns into a de-duplicated list with one entry per result.

    Every input gives at least one entry, so the caller emits a result (a `Letter` or a
    `LetterError` row) for each and nothing is silently dropped:

    * a file named explicitly is returned as given, whatever it is (a missing file, a FIFO, a
      dangling symlink: `parse_many` reports what is wrong with it);
    * a folder (or a symlink to one) is walked recursively in name order (`walk_letter_folder`);
      a folder with nothing to read is returned itself and reported as such;
    * a glob pattern gives its matches in sorted order (matched folders are walked, other matches
      kept as if named), or the pattern itself when it matches nothing ("pattern matched no files").
    """
    found: dict[str, Path] = {}
    for raw in inputs:
        p = Path(raw)
        if _lexists(p):
            _expand(p, found)
        elif glob.has_magic(str(raw)):
            seen: set = set()  # `**` follows symlinked folders: one entry per file reached
            n_before = len(found)
            try:
                matches = sorted(glob.glob(str(raw), recursive=True))
            except RecursionError:  # `**` recurses per folder level
                matches = []
            for match in matches:
                mp = Path(match)
                ident = _identity(mp) or match
                if ident not in seen:
                    seen.add(ident)
                    _expand(mp, found)
            if len(found) == n_before:
                found.setdefault(str(p), p)  # parse_many: "pattern matched no files"
        else:
            found.setdefault(str(p), p)  # missing: parse_many yields a LetterError for it
    return list(found.values())


def _expand(p: Path, found: dict[str, Path]) -> None:
    if p.is_dir():
        entries = walk_letter_folder(p)
        for sub in entries or [p]:  # an empty folder is reported, not dropped
            found.setdefault(str(sub), sub)
    else:
        found.setdefault(str(p), p)


def walk_letter_folder(folder: str | Path) -> list[Path]:
    """The entries of a folder walk that get a result, depth first in name order (deterministic).

    Included: every entry whose name ends in .pdf or .txt (any case), whatever it is, and every
    entry that is not an ordinary file or folder whatever its name: symlinks to folders (reported,
    not followed, so a walk never loops), dangling or looping symlinks, FIFOs, sockets, devices,
    and folders that cannot be listed. Skipped: ordinary files with other suffixes (.csv, .docx,
    .DS_Store ...: evidently not letters) and symlinks that resolve to such a file. A folder
    reached twice (bind mounts) is walked once.
    """
    out: list[Path] = []
    visited: set = set()
    # Depth-first in name order with an explicit stack (a folder tree 1,000 levels deep must not hit
    # Python's recursion limit): each stack entry is the sorted, not yet visited entries of one folder.
    stack: list[list] = []

    def enter(d: Path) -> None:
        ident = _identity(d)
        if ident in visited:
            return
        visited.add(ident)
        try:
            with os.scandir(d) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError:
            out.append(d)  # parse_many reports why it cannot be read
            return
        stack.append([(d / e.name, e) for e in reversed(entries)])

    enter(Path(folder))
    while stack:
        if not stack[-1]:
            stack.pop()
            continue
        path, e = stack[-1].pop()
        try:
            if e.is_dir(follow_symlinks=False):
                enter(path)
                continue
            is_link = e.is_symlink()
            is_regular = e.is_file(follow_symlinks=False)
        except OSError:
            out.append(path)
            continue
        if path.suffix.lower() in LETTER_SUFFIXES:
            out.append(path)
        elif is_link:
            target = _stat(path)
            if target is None or not stat.S_ISREG(target.st_mode):
                out.append(path)  # dangling, looping, or to a folder/FIFO/...: reported
            elif Path(os.path.realpath(path)).suffix.lower() in LETTER_SUFFIXES:
                out.append(path)  # a link named without a suffix to a letter file
        elif not is_regular:
            out.append(path)  # FIFO, socket, device
    return out


def _lexists(p: Path) -> bool:
    try:
        os.lstat(p)
        return True
    except (OSError, ValueError):
        return False


def _stat(p: Path):
    try:
        return os.stat(p)
    except (OSError, ValueError):
        return None


def _identity(p: Path):
    st = _stat(p)
    return (st.st_dev, st.st_ino) if st is not None else None


def _parse_one(path: Path) -> Letter | LetterError:
    try:
        return parse_file(path)
    except LetterError as exc:
        return exc
    except RecursionError:
        return LetterError(str(path), "structure nested too deeply to parse")
    except MemoryError:
        raise  # in a worker: reported as "exceeded the ... memory limit", and the worker is replaced
    except Exception as exc:  # noqa: BLE001 - a batch never dies on one bad file
        return LetterError(str(path), f"unexpected {type(exc).__name__} while parsing")


def _parse_one_json(path: str) -> dict:
    """Worker side of `parse_many`: `_parse_one` as a JSON value (the parent never unpickles worker output)."""
    result = _parse_one(Path(path))
    if isinstance(result, LetterError):
        return {"error": [str(result.source), str(result.reason)]}
    return {"letter": result.to_dict()}


def _from_json(value: dict) -> Letter | LetterError:
    """Parent side: a `Letter` or `LetterError` back from `_parse_one_json`'s value."""
    if "error" in value:
        source, reason = value["error"]
        return LetterError(source, reason)
    d = dict(value["letter"])
    items = tuple(Item(**item) for item in d.pop("items"))
    return Letter(**{**d, "items": items, "warnings": tuple(d.get("warnings") or ())})


def parse_many(
    paths: Iterable[str | Path],
    *,
    workers: int = 1,
    isolate: bool = True,
    time_limit: float | None = PARSE_TIME_LIMIT,
    memory_limit: int | None = PARSE_MEMORY_LIMIT,
) -> Iterator[Letter | LetterError]:
    """Parse letters, yielding a `Letter` or a `LetterError` for each path, in input order.

    By default each letter is parsed in a worker process (`imr_model.parse_pool`) under a budget of
    `time_limit` seconds and `memory_limit` bytes of address space: a letter that exceeds it, or
    that crashes its worker (a PDFium segfault, an abort, a decompression bomb), becomes one
    `LetterError` saying so, the worker is replaced and the batch goes on. `workers` processes
    parse at once (0 = one per core). Results stream: memory stays bounded for any number of paths.

    ``isolate=False`` parses in this process, one letter at a time, with no time or memory bound:
    only for trusted input (a crash or hang then takes the caller down). `workers` must be 1 then.
    Off POSIX (no `resource`, `os.wait4`), parsing is always in-process.
    """
    paths = (Path(p) for p in paths)
    if not isolate or os.name != "posix":
        if workers != 1 and isolate is False:
            raise ValueError("parse_many(isolate=False) parses in this process: workers must be 1")
        for p in paths:
            try:
                yield _parse_one(p)
            except MemoryError:
                yield LetterError(str(p), "ran out of memory while parsing")
        return
    results = parse_pool.run_isolated(
        "imr_model.letters:_parse_one_json",
        (str(p) for p in paths),
        lambda p, reason: {"error": [p, reason]},
        workers=workers,
        time_limit=time_limit,
        memory_limit=memory_limit,
    )
    for value in results:
        yield _from_json(value)


# --------------------------------------------------------------------------- header / summary


def _parse_header(lines: list[str]) -> dict:
    stop = next((i for i, ln in enumerate(lines) if SUMMARY_HEADING.search(ln) or ISSUES_HEADING.search(ln)), 60)
    head = "\n".join(lines[: max(stop, 1)])
    out: dict = {}
    for key, pattern in _HEADER_PATTERNS.items():
        m = pattern.search(head)
        if not m:
            continue
        if key == "case_number":
            out[key] = re.sub(r"\s", "", m.group(1)).upper()
        elif key == "priority":
            out[key] = m.group(1).capitalize()
        else:
            out[key] = _iso(m)
    lic = re.search(r"State\(s\)\s+of\s+Licensure\s*:\s*(.*)", head, re.I)
    if lic:
        out["reviewer_licensure"] = normalize_ws(lic.group(1)) or None
    spec = re.search(r"Certification\(s\)\s*/\s*Specialty\s*:\s*((?:.*\n?){1,3})", head, re.I)
    if spec:
        text = re.split(r"\n\s*\n|CLINICAL\s+CASE|IMR\s+ISSUES|" + PAGE_BREAK, spec.group(1))[0]
        out["reviewer_specialty"] = normalize_ws(text) or None
    return out


def _case_summary(lines: list[str]) -> str:
    start = next((i for i, ln in enumerate(lines) if SUMMARY_HEADING.search(ln)), None)
    if start is None:
        start = next((i for i, ln in enumerate(lines) if re.search(r"Case\s+Summary\s*:", ln, re.I)), None)
    if start is None:
        return ""
    end = next((i for i in range(start + 1, len(lines)) if ISSUES_HEADING.search(lines[i])), len(lines))
    body = normalize_ws(" ".join(ln for ln in lines[start + 1 : end] if ln != PAGE_BREAK))
    body = re.sub(r"^.*?Case\s+Summary\s*:\s*", "", body, flags=re.I) if start and "Summary:" in lines[start] else body
    # 2013 letters list the decisions right after the summary: they must not leak into it.
    body = re.split(r"(?:\b\d{1,2}\s*[.)]\s*)?MAXIMUS\s+Federal\s+Services,?\s+Inc\.?\s+has\s+determined", body, flags=re.I)[0]
    return normalize_ws(_SUMMARY_LEAD.sub("", body))


# --------------------------------------------------------------------------- 2015/2016 items


def _decision_markers(lines: list[str], start: int) -> list[tuple[int, str]]:
    """(line index of the decision, decision) for each item; the title ends on that line or the one before."""
    marks = []
    for i in range(start, len(lines)):
        ln = lines[i]
        m = DECISION_LINE.match(ln) if (":" in ln or ";" in ln) else None  # the pattern needs one of them
        if m and m.group("title").strip() and not _FIELD_START.match(ln):
            marks.append((i, _decision_word(m.group("decision"))))
            continue
        if DECISION_ALONE.match(ln):
            j = _prev_text_line(lines, i)
            if j is not None and lines[j].rstrip().endswith((":", ";")):
                marks.append((i, _decision_word(DECISION_ALONE.match(ln).group("decision"))))
    return marks


def _prev_text_line(lines: list[str], i: int) -> int | None:
    j = i - 1
    while j >= 0 and (not lines[j].strip() or lines[j] == PAGE_BREAK):
        j -= 1
    return j if j >= 0 else None


def _title_start(lines: list[str], end: int, floor: int) -> int:
    """Walk back from the title's last line to the previous paragraph break (never past `floor`).

    A page break ends the walk only when the text before it ends a sentence. Where the region since
    the previous item has no blank lines at all (text without paragraph breaks), a line ending with a
    period ends the previous item's rationale.
    """
    no_breaks = not any(not ln.strip() for ln in lines[floor:end])
    i = end
    before: int | None = None  # the text line before a run of page breaks, found once per run
    while i - 1 >= floor:
        prev = lines[i - 1]
        if prev == PAGE_BREAK:
            if before is None or before >= i - 1:
                before = _prev_text_line(lines, i - 1)
            if before is None or before < floor or lines[before].rstrip().endswith((".", ":")):
                break
            i -= 1
            continue
        if not prev.strip() or _SET_FORTH.search(prev) or ISSUES_HEADING.search(prev) or _FIELD_START.match(prev):
            break
        if no_breaks and prev.rstrip().endswith("."):
            break
        i -= 1
    return i


def _parse_items_2015(lines: list[str]) -> list[Item]:
    heading = next((i for i, ln in enumerate(lines) if ISSUES_HEADING.search(ln)), None)
    start = heading + 1 if heading is not None else 0
    marks = _decision_markers(lines, start)
    if not marks:
        return []
    spans = []  # (title_start, title_end_exclusive, decision_line, decision)
    floor = start
    for line_no, decision in marks:
        has_title_on_line = bool(DECISION_LINE.match(lines[line_no]))
        title_end = line_no if has_title_on_line else _prev_text_line(lines, line_no)
        t0 = _title_start(lines, title_end, floor)
        spans.append((t0, title_end, line_no, decision))
        floor = line_no + 1
    items = []
    for k, (t0, t_end, line_no, decision) in enumerate(spans):
        title_lines = [ln for ln in lines[t0 : t_end + 1] if ln != PAGE_BREAK]
        if DECISION_LINE.match(lines[line_no]):
            title_lines[-1] = DECISION_LINE.match(lines[line_no]).group("title")
        body_end = spans[k + 1][0] if k + 1 < len(spans) else len(lines)
        body = "\n".join(ln for ln in lines[line_no + 1 : body_end] if ln != PAGE_BREAK)
        items.append(Item(index=k + 1, request=_clean_request(" ".join(title_lines)), decision=decision, **_fields(body)))
    return items


def _clean_request(title: str) -> str:
    title = normalize_ws(title).rstrip(":; ")
    return re.sub(r"\s+is$", "", title)  # "The remaining IMR eligible portion ..., X is:" → "..., X"


def _fields(body: str) -> dict[str, str]:
    """Split an item body into the three labelled fields; text before the first label is ignored."""
    out = {k: "" for k in _FIELD}
    matches = list(_FIELD_RE.finditer(body))
    for n, m in enumerate(matches):
        end = matches[n + 1].start() if n + 1 < len(matches) else len(body)
        key = m.lastgroup
        if not out[key]:
            out[key] = normalize_ws(body[m.end() : end])
    return out
