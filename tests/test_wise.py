"""WISE: the official prompt files read (bad ones named by file and line), images painted in
both modes with their trajectories and resumed byte for byte, the judge client against a
local fake endpoint (good, malformed, slow and failing replies: retries, a request budget, a
cache that a restarted job never pays for twice), and the three scoring conventions on
fixtures worked out by hand."""

import http.server
import json
import os
import re
import threading
import time

import pytest

from strokes_jax.benchmarks import cli, judge as jd, store, wise, wise_protocol
from strokes_jax.benchmarks.store import BenchmarkError
from test_geneval_run import StopAfter, Killed, _gen


def _entry(pid, prompt, cat, sub="Festival", expl=None):
    return {"Prompt": prompt, "Explanation": expl or f"explanation {pid}", "Category": cat, "Subcategory": sub,
            "prompt_id": pid}


# One prompt per category of the legacy set; 530 is time there (401-567) and would be space
# in the verified numbering (521-640).
LEGACY = [_entry(1, "p", "Cultural knowledge"), _entry(530, "p", "time", "Longitudinal time"),
          _entry(568, "p", "Space", "Occlusion"), _entry(701, "p", "Biology", "State"),
          _entry(801, "p", "Physical Knowledge", "Mechanics"), _entry(901, "p", "Chemistry", "Reaction")]


def _write_prompts(path, entries):
    path.write_text(json.dumps(entries, indent=4) + "\n")
    return str(path)


def test_prompt_files_and_their_errors(tmp_path):
    a = _write_prompts(tmp_path / "a.json", LEGACY[:3])
    b = _write_prompts(tmp_path / "b.json", LEGACY[3:])
    got = wise.read_prompts([b, a])
    assert [p.prompt_id for p in got] == [1, 530, 568, 701, 801, 901]
    assert got[0].where == f"{a}:2" and got[1].where == f"{a}:9"  # the line each object opens on
    assert wise.prompt_set(got) == "legacy" and wise.default_protocol(got) == "legacy"
    assert wise.prompt_set([p for p in got if p.prompt_id == 1]) == "either"
    moved = [dict(e, Category="Space") if e["prompt_id"] == 568 else e for e in LEGACY]
    moved[1] = dict(moved[1], prompt_id=521, Category="Space")  # verified: space from 521
    assert wise.prompt_set(wise.read_prompts([_write_prompts(tmp_path / "v.json", moved[:3])])) == "verified"

    with pytest.raises(BenchmarkError, match=r"nope\.json: no such file"):
        wise.read_prompts([str(tmp_path / "nope.json")])
    text = json.dumps(LEGACY[:2], indent=4)
    no_expl = json.dumps([LEGACY[0], {k: v for k, v in LEGACY[1].items() if k != "Explanation"}], indent=4)
    bad = tmp_path / "bad.json"
    for broken, message in [
        (no_expl, r"bad\.json:9: prompt 530 needs a string 'Explanation'"),
        (text.replace('"prompt_id": 530', '"prompt_id": "530"'), r"bad\.json:9: needs an integer \"prompt_id\""),
        (text.replace('"prompt_id": 530', '"prompt_id": 1'),
         r"bad\.json:9: prompt_id 1 again \(first at .*bad\.json:2\)"),
        (text.replace('"time",', '"time"'), r"bad\.json:13: not JSON \(Expecting ',' delimiter\)"),
        (text[:-1], r"bad\.json:16: the array is not closed"),
        ('{"Prompt": "p"}', r"bad\.json:1: expected a JSON array of prompts"),
    ]:
        bad.write_text(broken)
        with pytest.raises(BenchmarkError, match=message):
            wise.read_prompts([str(bad)])


def _prompts(ref, ids=(1, 401, 568, 701, 801)):
    """WISE prompts that the oracle can paint (its own prompt), told apart by explanation."""
    return [wise.WisePrompt(pid, ref.prompt, f"explanation {pid}", "Cultural knowledge" if pid <= 400 else "time",
                            "Longitudinal time") for pid in ids]


def test_both_modes_with_trajectories_resume_identically(etok, ref, tmp_path):
    prompts = _prompts(ref)
    gen = _gen(etok, ref)
    whole, cut = str(tmp_path / "whole"), str(tmp_path / "cut")
    counts = wise.generate(gen, prompts, whole, modes=("process", "single"), seed=3, batch_size=2)
    assert counts == {"process": {"prompts": 5, "generated": 5}, "single": {"prompts": 5, "generated": 5}}
    for mode in ("process", "single"):
        assert sorted(os.listdir(os.path.join(whole, mode, "images"))) == [f"{i}.png" for i in (1, 401, 568, 701, 801)]
        traj = os.path.join(whole, mode, "trajectories")
        assert {"1.txt", "1_filmstrip.png", "1.json"} <= set(os.listdir(traj))
    assert open(os.path.join(whole, "process", "trajectories", "1.txt")).read().count("<image>") == len(ref.images())
    assert json.load(open(os.path.join(whole, "prompts.json")))[0]["Explanation"] == "explanation 1"
    with pytest.raises(Killed):  # dies after the first chunk of two prompts
        wise.generate(StopAfter(gen, 1), prompts, cut, modes=("process", "single"), seed=3, batch_size=2)
    os.remove(os.path.join(cut, "process", "images", "401.png"))  # a chunk half written
    counting = StopAfter(gen, 99)
    counts = wise.generate(counting, prompts, cut, modes=("process", "single"), seed=3, batch_size=2)
    assert counts["process"]["generated"] == 5 and counts["single"]["generated"] == 5 and counting.calls == 6
    from strokes_jax.benchmarks.geneval import folder_digest
    assert folder_digest(cut) == folder_digest(whole)


# ---- a fake OpenAI-compatible endpoint -------------------------------------------------

GOOD = {"legacy": "**Consistency**: 2\nRealism: 1\nAesthetic Quality: 0", "verified": "<think>x</think>\nScore: 1"}


class FakeJudge:
    """Chat completions on 127.0.0.1: each prompt (told by its explanation) follows a script
    of replies, one per request, the last repeated: good | malformed (not JSON) | noscore
    (JSON without a readable score) | slow (answers after the client's timeout) | fail (500)
    | denied (401). Counts requests per prompt id."""

    def __init__(self, scripts: dict[int, list[str]], slow_s: float = 3.0):
        self.scripts, self.slow_s = scripts, slow_s
        self.counts: dict[int, int] = {}
        self.bodies: list[dict] = []
        self._lock = threading.Lock()
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                text = body["messages"][1]["content"][0]["text"]
                pid = int(re.search(r'EXPLANATION: "explanation (\d+)"', text).group(1))
                with outer._lock:
                    n = outer.counts.get(pid, 0)
                    outer.counts[pid] = n + 1
                    outer.bodies.append(dict(body, auth=self.headers.get("Authorization")))
                script = outer.scripts.get(pid, ["good"])
                act = script[min(n, len(script) - 1)]
                proto = "legacy" if "Vincennes" in body["messages"][0]["content"][0]["text"] else "verified"
                try:
                    if act == "slow":
                        time.sleep(outer.slow_s)
                    if act in ("fail", "denied"):
                        self.send_response(500 if act == "fail" else 401)
                        self.end_headers()
                        self.wfile.write(b"nope")
                        return
                    content = {"good": GOOD[proto], "slow": GOOD[proto], "noscore": "I like it"}.get(act)
                    data = (json.dumps({"choices": [{"message": {"content": content}}]}).encode()
                            if content else b"<html>oops")
                    self.send_response(200)
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (the slow case)

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def judged_root(etok, ref, tmp_path):
    root = str(tmp_path / "root")
    wise.generate(_gen(etok, ref), _prompts(ref), root, modes=("process",), seed=0, batch_size=5)
    return root


def _judge(url, cache_path, max_requests=None, model="judge-1", key=None):
    ep = jd.Endpoint(url, model, key, timeout=1.0, attempts=3, backoff=0.0)
    return jd.Judge(ep, jd.Cache(cache_path), max_requests)


def test_judge_retries_bounds_and_never_pays_twice(judged_root):
    scripts = {1: ["good"], 401: ["malformed", "good"], 568: ["slow", "good"], 701: ["fail"],
               801: ["noscore", "good"]}
    cache = os.path.join(judged_root, "judge_cache.jsonl")
    with FakeJudge(scripts) as fake:
        j = _judge(fake.url, cache, key="sk-test")
        out = wise.judge_root(judged_root, j, "legacy", workers=3)
        assert fake.counts == {1: 1, 401: 2, 568: 2, 701: 3, 801: 2}
        assert j.requests == 10 and [p for p, _ in out["failures"]] == [701] and "HTTP 500" in out["failures"][0][1]
        assert out["modes"]["process"] == {"judged": 4, "prompts": 5, "images": 5}
        body = fake.bodies[0]
        assert body["auth"] == "Bearer sk-test" and body["model"] == "judge-1" and body["max_tokens"] == 2000
        assert body["messages"][1]["content"][1]["image_url"]["url"].startswith("data:image/png;base64,")
        rows = [json.loads(x) for x in open(os.path.join(judged_root, "process", "judge", "legacy_scores.jsonl"))]
        assert [r["prompt_id"] for r in rows] == [1, 401, 568, 801]
        assert rows[0] == {"prompt_id": 1, "Subcategory": "Longitudinal time", "consistency": 2.0, "realism": 1.0,
                           "aesthetic_quality": 0.0}

        # Restarted (a new process: a new client on the same cache file, whose last line a
        # crash cut short): only the image without a verdict is asked for again.
        with open(cache, "a") as f:
            f.write('{"key": "abc", "scor')
        scripts[701] = ["good"]
        j = _judge(fake.url, cache)
        assert j.cache.bad_lines == 1 and len(j.cache) == 4
        out = wise.judge_root(judged_root, j, "legacy", workers=3)
        assert fake.counts == {1: 1, 401: 2, 568: 2, 701: 4, 801: 2} and j.requests == 1 and not out["failures"]

        # Another protocol is another verdict; a budget stops the run after that many requests.
        j = _judge(fake.url, cache, max_requests=2)
        out = wise.judge_root(judged_root, j, "verified", workers=2)
        assert out["budget_spent"] and j.requests == 2 and sum(fake.counts.values()) == 13
        assert fake.bodies[-1]["chat_template_kwargs"] == {"enable_thinking": False}
        j = _judge(fake.url, cache, max_requests=1)  # spent again: the verdicts bought still count
        out = wise.judge_root(judged_root, j, "verified", workers=2)
        assert out["budget_spent"] and out["modes"]["process"]["judged"] == 3
        assert len(open(os.path.join(judged_root, "process", "judge", "verified_scores.jsonl")).readlines()) == 3
        j = _judge(fake.url, cache)
        out = wise.judge_root(judged_root, j, "verified", workers=2)
        assert j.requests == 2 and not out["budget_spent"] and out["modes"]["process"]["judged"] == 5
        assert sum(fake.counts.values()) == 16

        # A refused key stops at once, without retries.
        scripts[1] = ["denied"]
        j = _judge(fake.url, str(os.path.join(judged_root, "other_cache.jsonl")), model="judge-2")
        before = fake.counts[1]
        with pytest.raises(jd.JudgeError, match="HTTP 401"):
            j.judge("legacy", 1, "p", "explanation 1", os.path.join(judged_root, "process", "images", "1.png"))
        assert fake.counts[1] == before + 1


def test_the_judge_command(judged_root, monkeypatch, capsys):
    with FakeJudge({}) as fake:
        args = ["judge", judged_root, "--url", fake.url, "--model", "m", "--api-key-env", "MY_JUDGE_KEY",
                "--backoff", "0"]
        monkeypatch.delenv("MY_JUDGE_KEY", raising=False)
        assert cli.main("wise", args, prog="wise") == 2
        assert "MY_JUDGE_KEY: that environment variable is not set" in capsys.readouterr().err
        monkeypatch.setenv("MY_JUDGE_KEY", "sk-1")
        assert cli.main("wise", args + ["--max-requests", "3"], prog="wise") == cli.EXIT_INCOMPLETE
        assert "--max-requests 3 spent" in capsys.readouterr().err
        assert cli.main("wise", args, prog="wise") == 0
        out = capsys.readouterr().out
        assert sum(fake.counts.values()) == 5 and fake.bodies[0]["auth"] == "Bearer sk-1"
        assert "process: 5 of 5 images judged (verified protocol, m)" in out  # the set is not legacy's
        assert "WISE_Verified" in out and "n/a (no legacy-protocol judgments)" in out


# ---- the three conventions, by hand ----------------------------------------------------

def test_three_conventions_worked_by_hand():
    def row(pid, c, r, a, sub="x"):
        return {"prompt_id": pid, "Subcategory": sub, "consistency": c, "realism": r, "aesthetic_quality": a}

    legacy = [row(1, 2, 1, 0), row(2, 0, 0, 2),  # (1.4 + 0.2) / 2 = 0.8 and 0.2 / 2 = 0.1: culture 0.45
              row(401, 1, 1, 1, "Longitudinal time"),  # 1.0 / 2 = 0.5
              row(568, 2, 2, 2, "Occlusion"),  # 1.0
              row(701, 0, 2, 0),  # 0.4 / 2 = 0.2
              row(801, 1, 0, 0),  # 0.7 / 2 = 0.35
              row(901, 2, 0, 1)]  # 1.5 / 2 = 0.75
    o = wise.original(legacy)
    assert o["categories"] == pytest.approx({"culture": 0.45, "time": 0.5, "space": 1.0, "biology": 0.2,
                                             "physics": 0.35, "chemistry": 0.75})
    # 0.4 * 0.45 + 0.167 * 0.5 + 0.133 * 1.0 + 0.1 * (0.2 + 0.35 + 0.75) = 0.18 + 0.0835 + 0.133 + 0.13
    assert o["overall"] == pytest.approx(0.5265) and o["counts"]["culture"] == 2
    # (0.45 + 0.5 + 1.0 + 0.2 + 0.35 + 0.75) / 6 = 3.25 / 6
    assert wise.bagel(legacy)["overall"] == pytest.approx(3.25 / 6)
    # BAGEL tells time from space by subcategory: the same row under a space subcategory moves.
    moved = wise.bagel([dict(r, Subcategory="Occlusion") if r["prompt_id"] == 401 else r for r in legacy])
    assert "time" not in moved["categories"] and moved["categories"]["space"] == pytest.approx(0.75)
    assert moved["overall"] is None
    assert wise.original(legacy[:-1])["overall"] is None  # no chemistry: no overall

    ver = [{"prompt_id": p, "Subcategory": "x", "score": s}
           for p, s in [(1, 1), (2, 0), (401, 1), (521, 0), (641, 1), (761, 1), (881, 0)]]
    v = wise.verified(ver)
    # 641 is biology in the verified numbering (it would be space in the legacy one)
    assert v["categories"] == {"culture": 0.5, "time": 1.0, "space": 0.0, "biology": 1.0, "physics": 1.0,
                               "chemistry": 0.0}
    assert v["overall"] == pytest.approx(0.4 * 0.5 + 0.12 * (1 + 0 + 1 + 1 + 0))  # 0.56

    results = {"process": {name: {**fn(rows), "judged": len(rows), "protocol": proto}
                           for (name, proto, fn, _), rows in zip(wise.CONVENTIONS, (legacy, legacy, ver))}}
    text = wise.table(results, title="t")
    lines = text.splitlines()
    assert lines[3].split()[:8] == ["original", "0.4500", "0.5000", "1.0000", "0.2000", "0.3500", "0.7500",
                                    "0.5265"]
    assert lines[4].split()[7] == "0.5417" and lines[5].split()[7] == "0.5600"
    assert "WISE_legacy/Calculate.py" in lines[3] and "cal_score.py" in lines[4] and "calculate_verified" in lines[5]


def test_the_official_protocol_texts():
    m = wise_protocol.messages("legacy", 'Holiday "X"', "This refers to Christmas", "QUJD")
    assert m[0]["content"][0]["text"].startswith("You are a professional Vincennes image quality audit expert")
    text = m[1]["content"][0]["text"]
    assert 'PROMPT: "Holiday "X""\nEXPLANATION: "This refers to Christmas"' in text
    assert "**Input Parameters**  \n- PROMPT: [User's original prompt to]  \n" in text  # verbatim, spaces too
    assert wise_protocol.parse_reply("legacy", "Consistency: 2\nRealism: 2") is None
    assert wise_protocol.parse_reply("legacy", "2\n0\n1") == {"consistency": 2.0, "realism": 0.0,
                                                              "aesthetic_quality": 1.0}
    assert wise_protocol.parse_reply("verified", "**Score**: 0") == {"score": 0.0}
    assert wise_protocol.parse_reply("verified", "Score: 7") is None
    assert "Return only `Score: 0` or `Score: 1`." in wise_protocol.user_text("verified", "p", "e")


def test_scores_command_and_store_leftovers(tmp_path, capsys):
    root = tmp_path / "r"
    store.write_text(str(root / "process" / "images" / "1.png"), "")
    store.write_text(str(root / "process" / "judge" / "verified_scores.jsonl"),
                     '{"prompt_id": 1, "Subcategory": "x", "score": 1.0}\n')
    assert cli.main("wise", ["scores", str(root)], prog="wise") == 0
    out = capsys.readouterr().out
    assert "WISE_Verified     1.0000" in out and "n/a" in out
    assert not [n for n in os.listdir(root / "process" / "judge") if n.startswith(store.TMP_PREFIX)]
