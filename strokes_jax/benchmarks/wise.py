"""WISE with a trained model: the official prompt files in, images for the official judges
out, and the three scoring conventions in use side by side.

Prompt files (github:PKU-YuanGroup/WISE, commit eb51174): a JSON array of objects with
`Prompt`, `Explanation`, `Category`, `Subcategory` and an integer `prompt_id`, one file per
group (`WISE_legacy/data/cultural_common_sense.json`, `spatio-temporal_reasoning.json`,
`natural_science.json`; `data_verified/*_verified.json` or the merged `merge.json` for
WISE_Verified). The two sets number their categories differently (see the ranges below).

  <root>/run.json, <root>/prompts.json        what the images came from; the prompts used
  <root>/<mode>/images/<prompt_id>.png        the official image folder (1.png ... 1000.png)
  <root>/<mode>/trajectories/<prompt_id>.txt  the whole trajectory text, a filmstrip and
                                              the generation record (NFE, caps) beside it
  <root>/<mode>/judge/<protocol>_scores.jsonl the official scores files, from the cache
  <root>/judge_cache.jsonl                    every verdict bought (judge.py)

Prompts are painted in fixed chunks of `batch_size` (by prompt id); a chunk's RNG is seeded by
(seed, its first prompt id), so a resumed run redoes unfinished chunks with the same noise.

Conventions (always labelled; a number means nothing without its convention):
  original       WISE_legacy/Calculate.py: WiScore = (0.7 C + 0.2 R + 0.1 A) / 2 per image
                 (judge scores on 0..2), category means, overall 0.4 culture + 0.167 time +
                 0.133 space + 0.1 each science (the prompt shares).
  BAGEL          ByteDance-Seed/Bagel eval/gen/wise/cal_score.py: the same per-image score,
                 time and space told apart by Subcategory, the six category means averaged
                 equally (the paper's numbers follow this one).
  WISE_Verified  calculate_verified.py, the official default since 2026-04-19: the verified
                 prompts, a binary 0/1 judge score, overall 0.4 culture + 0.12 each other.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import os
import threading
from typing import Sequence

import numpy as np
from tqdm import tqdm

from strokes_jax.benchmarks import judge as judge_mod
from strokes_jax.benchmarks import store
from strokes_jax.benchmarks.store import BenchmarkError

CATEGORIES = ("culture", "time", "space", "biology", "physics", "chemistry")
# Inclusive prompt-id ranges of each official scoring script.
LEGACY_RANGES = {"culture": (1, 400), "time": (401, 567), "space": (568, 700),
                 "biology": (701, 800), "physics": (801, 900), "chemistry": (901, 1000)}
VERIFIED_RANGES = {"culture": (1, 400), "time": (401, 520), "space": (521, 640),
                   "biology": (641, 760), "physics": (761, 880), "chemistry": (881, 1000)}
ORIGINAL_WEIGHTS = {"culture": 0.4, "time": 0.167, "space": 0.133,
                    "biology": 0.1, "physics": 0.1, "chemistry": 0.1}
VERIFIED_WEIGHTS = {"culture": 0.4, **{c: 0.12 for c in CATEGORIES[1:]}}
BAGEL_TIME = ("Longitudinal time", "Horizontal time")  # cal_score.py's time subcategories
# The files' Category values (one "Ecology" stray in natural_science_rewrite.json, id 748).
CATEGORY_FIELD = {"Cultural knowledge": "culture", "time": "time", "Space": "space", "Biology": "biology",
                  "Ecology": "biology", "Physical Knowledge": "physics", "Chemistry": "chemistry"}
MODES = {"process": ("process",), "single": ("single",), "both": ("process", "single")}
GEN_MODES = {"process": "process", "single": "single_pass"}
_FIELDS = (("Prompt", str), ("Explanation", str), ("Category", str), ("Subcategory", str))


@dataclasses.dataclass(frozen=True)
class WisePrompt:
    prompt_id: int
    prompt: str
    explanation: str
    category: str
    subcategory: str
    where: str = ""  # "FILE:LINE"

    def record(self) -> dict:
        return {"Prompt": self.prompt, "Explanation": self.explanation, "Category": self.category,
                "Subcategory": self.subcategory, "prompt_id": self.prompt_id}


def _line(text: str, pos: int) -> int:
    return text.count("\n", 0, pos) + 1


def _skip(text: str, i: int) -> int:
    while i < len(text) and text[i] in " \t\r\n":
        i += 1
    return i


def _array_items(text: str, path: str) -> list[tuple[int, object]]:
    """The elements of a top-level JSON array with the line each starts on."""
    dec, items = json.JSONDecoder(), []
    i = _skip(text, 0)
    if i >= len(text) or text[i] != "[":
        raise BenchmarkError(f"{path}:{_line(text, i)}: expected a JSON array of prompts (WISE's format)")
    i = _skip(text, i + 1)
    while i < len(text) and text[i] != "]":
        try:
            obj, j = dec.raw_decode(text, i)
        except json.JSONDecodeError as e:
            raise BenchmarkError(f"{path}:{e.lineno}: not JSON ({e.msg})") from None
        items.append((_line(text, i), obj))
        i = _skip(text, j)
        if i < len(text) and text[i] == ",":
            i = _skip(text, i + 1)
        elif i < len(text) and text[i] != "]":
            raise BenchmarkError(f"{path}:{_line(text, i)}: expected ',' or ']' after a prompt")
    if i >= len(text):
        raise BenchmarkError(f"{path}:{_line(text, i)}: the array is not closed")
    if _skip(text, i + 1) != len(text):
        raise BenchmarkError(f"{path}:{_line(text, _skip(text, i + 1))}: text after the array")
    return items


def _prompt(obj, where: str) -> WisePrompt:
    if not isinstance(obj, dict):
        raise BenchmarkError(f"{where}: expected a JSON object")
    pid = obj.get("prompt_id")
    if not isinstance(pid, int) or isinstance(pid, bool) or pid < 1:
        raise BenchmarkError(f"{where}: needs an integer \"prompt_id\" >= 1")
    for key, typ in _FIELDS:
        if not isinstance(obj.get(key), typ):
            raise BenchmarkError(f"{where}: prompt {pid} needs a string {key!r}")
    if not obj["Prompt"].strip():
        raise BenchmarkError(f"{where}: prompt {pid} has an empty \"Prompt\"")
    return WisePrompt(pid, obj["Prompt"], obj["Explanation"], obj["Category"], obj["Subcategory"], where)


def read_prompts(paths: Sequence[str]) -> list[WisePrompt]:
    """Prompts from WISE's JSON files (or JSONL, one object per line), sorted by prompt_id;
    a missing file, bad JSON, a missing field or a repeated id names the file and line."""
    out: dict[int, WisePrompt] = {}
    for path in paths:
        if not os.path.isfile(path):
            raise BenchmarkError(f"{path}: no such file")
        with open(path, encoding="utf-8") as f:
            text = f.read()
        if path.endswith(".jsonl"):
            items = []
            for n, line in enumerate(text.splitlines(), 1):
                if line.strip():
                    try:
                        items.append((n, json.loads(line)))
                    except json.JSONDecodeError as e:
                        raise BenchmarkError(f"{path}:{n}: not JSON ({e.msg})") from None
        else:
            items = _array_items(text, path)
        for n, obj in items:
            p = _prompt(obj, f"{path}:{n}")
            if p.prompt_id in out:
                raise BenchmarkError(f"{p.where}: prompt_id {p.prompt_id} again (first at {out[p.prompt_id].where})")
            out[p.prompt_id] = p
    if not out:
        raise BenchmarkError(f"{', '.join(paths)}: holds no prompts")
    return [out[k] for k in sorted(out)]


def category(prompt_id: int, ranges: dict) -> str | None:
    return next((c for c, (lo, hi) in ranges.items() if lo <= prompt_id <= hi), None)


def prompt_set(prompts: Sequence[WisePrompt]) -> str:
    """'legacy' or 'verified' when the prompts' Category fields fit only that set's id
    ranges; 'either' when both fit (the culture prompts alone); 'custom' when neither does."""
    fits = [name for name, ranges in (("legacy", LEGACY_RANGES), ("verified", VERIFIED_RANGES))
            if all(CATEGORY_FIELD.get(p.category) in (None, category(p.prompt_id, ranges)) for p in prompts)]
    return fits[0] if len(fits) == 1 else ("either" if fits else "custom")


def default_protocol(prompts: Sequence[WisePrompt]) -> str:
    """The judge each prompt set was made for; WISE_Verified's unless the set is the legacy one."""
    return "legacy" if prompt_set(prompts) == "legacy" else "verified"


# ---- generation --------------------------------------------------------------------------

def _files(root: str, mode: str, pid: int) -> tuple[str, str]:
    return (os.path.join(root, mode, "images", f"{pid}.png"),
            os.path.join(root, mode, "trajectories", str(pid)))


def _complete(root: str, mode: str, pid: int) -> bool:
    image, stem = _files(root, mode, pid)
    return all(os.path.isfile(p) for p in (image, stem + ".txt", stem + "_filmstrip.png", stem + ".json"))


def run_record(prompt_paths: Sequence[str], prompts: Sequence[WisePrompt], seed: int, batch_size: int,
               model: dict | None = None) -> dict:
    return {"benchmark": "wise", "prompt_files": [os.path.basename(p) for p in prompt_paths],
            "prompt_files_sha256": [store.sha256_file(p) for p in prompt_paths],
            "prompt_set": prompt_set(prompts), "prompts": len(prompts), "seed": seed,
            "batch_size": batch_size, **(model or {})}


def generate(generator, prompts: Sequence[WisePrompt], root: str, *, modes: Sequence[str] = ("process",),
             seed: int = 0, batch_size: int = 8, record: dict | None = None, image_shape=None) -> dict:
    """Paints every prompt once per mode, with its trajectory; resumes a killed run."""
    os.makedirs(root, exist_ok=True)
    store.remove_leftovers(root)
    if record is not None:
        store.check_run_record(os.path.join(root, "run.json"), record)
    store.write_json(os.path.join(root, "prompts.json"), [p.record() for p in prompts])
    image_shape = image_shape or generator.etok.image_shape
    chunks = [list(prompts[i:i + batch_size]) for i in range(0, len(prompts), batch_size)]
    counts = {}
    for mode in modes:
        if mode not in GEN_MODES:
            raise BenchmarkError(f"unknown mode {mode!r}; expected process or single")
        todo = [c for c in chunks if not all(_complete(root, mode, p.prompt_id) for p in c)]
        with tqdm(total=len(prompts), initial=len(prompts) - sum(map(len, todo)), desc=f"wise {mode}",
                  unit="prompt") as bar:
            for chunk in todo:
                rng = np.random.default_rng([seed, chunk[0].prompt_id])
                results = generator([p.prompt for p in chunk], GEN_MODES[mode], rng=rng)
                for p, r in zip(chunk, results):
                    image, stem = _files(root, mode, p.prompt_id)
                    store.write_trajectory(stem, r)
                    store.write_json(stem + ".json", {"prompt_id": p.prompt_id, "prompt": p.prompt,
                                                      **store.sample_record(0, r)})
                    store.write_png(image, store.final_image(r, image_shape))  # last: marks it done
                bar.update(len(chunk))
        counts[mode] = {"prompts": len(prompts), "generated": sum(map(len, todo))}
    return counts


# ---- judging -----------------------------------------------------------------------------

def load_root_prompts(root: str) -> list[WisePrompt]:
    path = os.path.join(root, "prompts.json")
    if not os.path.isfile(path):
        raise BenchmarkError(f"{path}: no such file (generate into {root} first: wise generate --out {root})")
    return read_prompts([path])


def modes_in(root: str) -> list[str]:
    return [m for m in GEN_MODES if os.path.isdir(os.path.join(root, m, "images"))]


def score_row(protocol: str, p: WisePrompt, scores: dict) -> dict:
    """A line of the official scores file (gpt_eval.py / vllm_eval.py `score` records)."""
    return {"prompt_id": p.prompt_id, "Subcategory": p.subcategory, **scores}


def judge_root(root: str, judge: judge_mod.Judge, protocol: str, modes: Sequence[str] | None = None,
               workers: int = 4) -> dict:
    """Judges every image under root (cache first), then rewrites each mode's official scores
    file from the cache. Returns per-mode counts and whether the request budget ran out."""
    prompts = load_root_prompts(root)
    modes = list(modes or modes_in(root))
    tasks = [(m, p) for m in modes for p in prompts if os.path.isfile(_files(root, m, p.prompt_id)[0])]
    fatal = threading.Event()  # the endpoint refuses everything: skip what is queued
    spent = False
    found: dict[tuple[str, int], dict] = {}

    def one(task):
        if fatal.is_set():
            return task, None
        m, p = task  # once the budget is spent, cached verdicts still come back, new ones raise
        return task, judge.judge(protocol, p.prompt_id, p.prompt, p.explanation, _files(root, m, p.prompt_id)[0])

    with concurrent.futures.ThreadPoolExecutor(max(1, workers)) as pool, \
            tqdm(total=len(tasks), desc=f"judge {protocol}", unit="image") as bar:
        futures = [pool.submit(one, t) for t in tasks]
        for fut in concurrent.futures.as_completed(futures):
            try:
                task, row = fut.result()
            except judge_mod.BudgetSpent:
                spent = True
                continue
            except judge_mod.JudgeError:
                fatal.set()
                for f in futures:
                    f.cancel()
                raise
            if row is not None:
                found[(task[0], task[1].prompt_id)] = row
            bar.update(1)
    out = {"budget_spent": spent, "requests": judge.requests, "failures": list(judge.failures), "modes": {}}
    for m in modes:
        rows = [score_row(protocol, p, found[(m, p.prompt_id)]["scores"]) for p in prompts if (m, p.prompt_id) in found]
        folder = os.path.join(root, m, "judge")
        store.write_text(os.path.join(folder, f"{protocol}_scores.jsonl"),
                         "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
        store.write_json(os.path.join(folder, f"{protocol}.json"),
                         {"protocol": protocol, "model": judge.endpoint.model, "judged": len(rows),
                          "prompts": len(prompts)})
        out["modes"][m] = {"judged": len(rows), "prompts": len(prompts),
                           "images": sum(1 for t in tasks if t[0] == m)}
    return out


# ---- the three conventions ---------------------------------------------------------------

def wiscore(row: dict) -> float:
    """The original per-image WiScore on 0..1 (Calculate.py; cal_score.py divides by 2 later)."""
    return (0.7 * row["consistency"] + 0.2 * row["realism"] + 0.1 * row["aesthetic_quality"]) / 2


def _bagel_category(row: dict) -> str | None:
    pid = row["prompt_id"]
    if 401 <= pid <= 700:
        return "time" if row.get("Subcategory") in BAGEL_TIME else "space"
    return category(pid, LEGACY_RANGES)


def _score(rows, cat_of, value_of, combine) -> dict:
    per: dict[str, list[float]] = {}
    for r in rows:
        c = cat_of(r)
        if c is not None:
            per.setdefault(c, []).append(value_of(r))
    means = {c: sum(v) / len(v) for c, v in per.items()}
    overall = combine(means) if all(c in means for c in CATEGORIES) else None
    return {"categories": {c: means[c] for c in CATEGORIES if c in means},
            "counts": {c: len(per[c]) for c in CATEGORIES if c in per}, "overall": overall}


def original(rows: Sequence[dict]) -> dict:
    return _score(rows, lambda r: category(r["prompt_id"], LEGACY_RANGES), wiscore,
                  lambda m: sum(ORIGINAL_WEIGHTS[c] * m[c] for c in CATEGORIES))


def bagel(rows: Sequence[dict]) -> dict:
    return _score(rows, _bagel_category, wiscore, lambda m: sum(m[c] for c in CATEGORIES) / len(CATEGORIES))


def verified(rows: Sequence[dict]) -> dict:
    return _score(rows, lambda r: category(r["prompt_id"], VERIFIED_RANGES), lambda r: float(r["score"]),
                  lambda m: sum(VERIFIED_WEIGHTS[c] * m[c] for c in CATEGORIES))


CONVENTIONS = (
    ("original", "legacy", original,
     "(0.7C+0.2R+0.1A)/2 per image, overall 0.4/0.167/0.133/0.1/0.1/0.1 (WISE_legacy/Calculate.py)"),
    ("BAGEL", "legacy", bagel,
     "same per image, six categories averaged equally (Bagel eval/gen/wise/cal_score.py)"),
    ("WISE_Verified", "verified", verified,
     "binary 0/1 judge, overall 0.4 culture + 0.12 x 5 (WISE calculate_verified.py)"),
)


def read_scores(path: str) -> list[dict]:
    rows = []
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if line.strip():
                    try:
                        rows.append(json.loads(line))
                    except json.JSONDecodeError as e:
                        raise BenchmarkError(f"{path}:{n}: not JSON ({e.msg})") from None
    return rows


def root_scores(root: str) -> dict:
    """mode -> convention -> scores, from the official scores files under root."""
    out = {}
    for m in modes_in(root):
        files = {proto: read_scores(os.path.join(root, m, "judge", f"{proto}_scores.jsonl"))
                 for proto in ("legacy", "verified")}
        out[m] = {name: {**fn(files[proto]), "judged": len(files[proto]), "protocol": proto}
                  for name, proto, fn, _ in CONVENTIONS}
    return out


def table(results: dict, title: str = "") -> str:
    """The conventions side by side, one block per mode, each row labelled with its rule."""
    head = f"{'convention':<14}" + "".join(f"{c:>10}" for c in CATEGORIES + ("overall",)) + "   judged  rule"
    lines = [title] if title else []
    for m, conv in results.items():
        lines += [f"{m}:", "  " + head]
        for name, _, _, rule in CONVENTIONS:
            s = conv[name]
            if not s["judged"]:
                lines.append(f"  {name:<14}{'n/a (no ' + s['protocol'] + '-protocol judgments)':>70}   {0:>6}  {rule}")
                continue
            cells = [f"{s['categories'][c]:>10.4f}" if c in s["categories"] else f"{'-':>10}" for c in CATEGORIES]
            overall = f"{s['overall']:>10.4f}" if s["overall"] is not None else f"{'n/a':>10}"
            lines.append(f"  {name:<14}{''.join(cells)}{overall}   {s['judged']:>6}  {rule}")
    return "\n".join(lines)
