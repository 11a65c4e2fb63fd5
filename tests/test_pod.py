"""`python -m strokes_jax pod`: the exact gcloud commands of `up`, `run` and `down` (dry runs
for v5p-128 and v6e-32), the checks that fail before anything runs, and the launcher against
a stand-in `gcloud` on PATH. The stand-in logs its argv, answers from a scenario the test
writes (scripted failures included) and plays the slice itself: `tpu-vm ssh --command` runs
the command once per worker, each worker a folder of its own as $HOME, with a stand-in
training command whose exit codes the test picks."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from strokes_jax import exits
from strokes_jax.launch import cli, gcloud, host, jobs, spec, worker

WHEEL = "dist/strokes_jax-0.1.0-py3-none-any.whl"
JAX = '"jax[tpu]<0.13,>=0.7"'
SETUP = ("set -e; mkdir -p ~/strokes_pod/configs; v=~/strokes_pod/venv; test -x $v/bin/pip || "
         "python3.11 -m venv $v 2>/dev/null || { sudo apt-get -qq update && sudo DEBIAN_FRONTEND=noninteractive "
         "apt-get -qq install -y python3.11-venv && python3.11 -m venv $v; }; "
         f"$v/bin/pip install -q {JAX} ~/strokes_jax-0.1.0-py3-none-any.whl; "
         "$v/bin/pip install -q --no-deps --force-reinstall ~/strokes_jax-0.1.0-py3-none-any.whl")
PY = "~/strokes_pod/venv/bin/python"

FAKE_GCLOUD = r'''#!{python}
import json, os, shutil, subprocess, sys
root = os.environ["FAKE_GCLOUD_ROOT"]
argv = sys.argv[1:]
with open(os.path.join(root, "calls.jsonl"), "a") as f:
    f.write(json.dumps(argv) + "\n")
path = os.path.join(root, "scenario.json")
scenario = json.load(open(path)) if os.path.exists(path) else {}
line = " ".join(argv)
for i, rule in enumerate(scenario.get("rules", [])):
    if all(m in line for m in rule["match"]):
        counter = os.path.join(root, f"rule{i}.count")
        n = int(open(counter).read()) if os.path.exists(counter) else 0
        open(counter, "w").write(str(n + 1))
        reply = rule["replies"][min(n, len(rule["replies"]) - 1)]
        if reply.get("emulate"):
            break
        sys.stdout.write(reply.get("stdout", ""))
        sys.stderr.write(reply.get("stderr", ""))
        sys.exit(reply.get("rc", 0))

def opt(name):
    for a in argv:
        if a.startswith(f"--{name}="):
            return a.split("=", 1)[1]
    return None

workers = scenario.get("workers", 1)
if argv[:4] == ["compute", "tpus", "tpu-vm", "describe"]:
    print(scenario.get("state", "READY"))
elif argv[:4] == ["compute", "tpus", "queued-resources", "describe"]:
    print(scenario.get("queued_state", "ACTIVE"))
elif argv[:4] == ["compute", "tpus", "tpu-vm", "scp"]:
    for w in range(workers):
        home = os.path.join(root, f"worker{w}")
        dest = os.path.join(home, argv[5].split(":", 1)[1])
        os.makedirs(os.path.dirname(dest), exist_ok=True)
        shutil.copy(argv[4], dest)
elif argv[:4] == ["compute", "tpus", "tpu-vm", "ssh"]:
    command, which = opt("command"), opt("worker")
    if command is None:
        print("(a shell on worker %s)" % which)
        sys.exit(0)
    codes = []
    for w in (range(workers) if which == "all" else [int(which)]):
        home = os.path.join(root, f"worker{w}")
        os.makedirs(home, exist_ok=True)
        if "pip install" in command:  # the setup: a venv whose python runs the stand-in training
            venv = os.path.join(home, "strokes_pod", "venv", "bin")
            os.makedirs(venv, exist_ok=True)
            os.makedirs(os.path.join(home, "strokes_pod", "configs"), exist_ok=True)
            with open(os.path.join(venv, "python"), "w") as f:
                f.write('#!/bin/bash\nif [ "$1 $2" = "-m strokes_jax" ] && [ "$3" != pod ]; then\n'
                        '  exec {python} {train} "$@"\nfi\nexec {python} "$@"\n')
            os.chmod(os.path.join(venv, "python"), 0o755)
            open(os.path.join(venv, "pip"), "w").close()
            os.chmod(os.path.join(venv, "pip"), 0o755)
            codes.append(0)
            continue
        env = dict(os.environ, HOME=home, TPU_WORKER_ID=str(w), GCE_METADATA_IP="127.0.0.1:9",
                   TPU_WORKER_HOSTNAMES=",".join(f"w{i}" for i in range(workers)))
        p = subprocess.run(["bash", "-c", command], cwd=home, env=env, capture_output=True, text=True)
        sys.stdout.write(p.stdout)
        sys.stderr.write(p.stderr)
        codes.append(p.returncode)
    bad = [c for c in codes if c]
    if bad:
        print("ERROR: (gcloud.compute.tpus.tpu-vm.ssh) [/usr/bin/ssh] exited with return code [%d]." % bad[0],
              file=sys.stderr)
        sys.exit(1 if which == "all" else bad[0])
'''

FAKE_TRAIN = r'''import os, signal, sys, time
home = os.environ["HOME"]
counter = os.path.join(home, "train_runs")
n = int(open(counter).read()) if os.path.exists(counter) else 0
open(counter, "w").write(str(n + 1))
codes = os.environ.get("FAKE_TRAIN_RCS", "0").split(",")
code = int(codes[min(n, len(codes) - 1)])
print("fake train", " ".join(sys.argv[1:]), "env", os.environ.get("TPU_WORKER_ID"), flush=True)
signal.signal(signal.SIGTERM, lambda s, f: (print("preempted at step 3", flush=True), sys.exit(75)))
deadline = time.time() + float(os.environ.get("FAKE_TRAIN_SECONDS", "0"))
step = 0
while time.time() < deadline:
    step += 1
    print(f"step {step}", flush=True)
    time.sleep(0.2)
print("finished with", code, flush=True)
sys.exit(code)
'''


@pytest.fixture
def fake(tmp_path, monkeypatch):
    """A stand-in gcloud on PATH; returns a helper to script it and read what it was asked."""
    root = tmp_path / "gcloud"
    bindir = tmp_path / "bin"
    root.mkdir()
    bindir.mkdir()
    (root / "train.py").write_text(FAKE_TRAIN)
    (bindir / "gcloud").write_text(FAKE_GCLOUD.replace("{python}", sys.executable)
                                   .replace("{train}", str(root / "train.py")))
    (bindir / "gcloud").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bindir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_GCLOUD_ROOT", str(root))
    monkeypatch.setenv("STROKES_POD_STATE", str(tmp_path / "state.json"))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "dist").mkdir()
    (tmp_path / WHEEL).write_text("not really a wheel")

    class Fake:
        path = root

        def scenario(self, **s):
            (root / "scenario.json").write_text(json.dumps(s))

        def calls(self):
            p = root / "calls.jsonl"
            return [json.loads(line) for line in p.read_text().splitlines()] if p.exists() else []

        def state(self):
            return json.loads((tmp_path / "state.json").read_text())

    return Fake()


def _pod(capsys, *args):
    code = cli.main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


# ---- the exact commands ---------------------------------------------------------------

V5P = ["--name", "exp", "--accelerator", "v5p-128", "--zone", "us-east5-a", "--project", "my-proj",
       "--capacity", "spot"]
V6E = ["--name", "tri", "--accelerator", "v6e-32", "--zone", "europe-west4-a", "--capacity", "best-effort",
       "--valid-until-duration", "6h"]


def test_dry_run_commands_v5p_128(fake, capsys):
    where = "--zone=us-east5-a --project=my-proj"
    code, out, _ = _pod(capsys, "up", "--dry-run", *V5P)
    assert code == 0
    assert out.splitlines() == [
        f"gcloud compute tpus tpu-vm describe exp {where} '--format=value(state)'",
        f"gcloud compute tpus tpu-vm create exp {where} --accelerator-type=v5p-128 --version=v2-alpha-tpuv5 --spot",
    ]
    code, out, _ = _pod(capsys, "run", "--dry-run", *V5P, "--workdir", "gs://my-bucket/exp1", "--wheel", WHEEL,
                        "--", "--config", "shapes_tiny:test", "--config.optim.lr=3e-4")
    assert code == 0
    assert out.splitlines() == [
        f"gcloud compute tpus tpu-vm describe exp {where} '--format=value(state)'",
        f"gcloud compute tpus tpu-vm scp {WHEEL} exp:strokes_jax-0.1.0-py3-none-any.whl {where} --worker=all --quiet",
        f"gcloud compute tpus tpu-vm ssh exp {where} --worker=all --quiet '--command={SETUP}'",
        f"gcloud compute tpus tpu-vm ssh exp {where} --worker=all --quiet '--command={PY} -m strokes_jax pod worker "
        f"start --job exp1 --kill-stale -- {PY} -m strokes_jax train --workdir gs://my-bucket/exp1 "
        f"--config shapes_tiny:test --config.optim.lr=3e-4'",
        f"gcloud compute tpus tpu-vm ssh exp {where} --worker=all --quiet '--command={PY} -m strokes_jax pod worker "
        f"status --job exp1'  # every 60s until every worker has exited",
    ]
    code, out, _ = _pod(capsys, "down", "--dry-run", *V5P)
    assert code == 0
    assert out.splitlines() == [f"gcloud compute tpus tpu-vm delete exp {where} --quiet"]
    assert fake.calls() == [] and not os.path.exists("state.json")  # a dry run runs and records nothing


def test_dry_run_commands_v6e_32_queued(fake, capsys):
    where = "--zone=europe-west4-a"
    code, out, _ = _pod(capsys, "up", "--dry-run", *V6E)
    assert code == 0
    assert out.splitlines() == [
        f"gcloud compute tpus queued-resources describe tri {where} '--format=value(state.state)'",
        f"gcloud alpha compute tpus queued-resources create tri {where} --node-id=tri --accelerator-type=v6e-32 "
        f"--runtime-version=v2-alpha-tpuv6e --best-effort --valid-until-duration=6h",
        f"gcloud compute tpus queued-resources describe tri {where} '--format=value(state.state)'"
        f"  # every 30s until ACTIVE",
    ]
    code, out, _ = _pod(capsys, "run", "--dry-run", *V6E, "--workdir", "gs://my-bucket/tri/", "--wheel", WHEEL,
                        "--job", "first", "--detach", "--", "--config", "shapes_tiny")
    assert code == 0
    assert out.splitlines() == [
        f"gcloud compute tpus queued-resources describe tri {where} '--format=value(state.state)'",
        f"gcloud compute tpus tpu-vm scp {WHEEL} tri:strokes_jax-0.1.0-py3-none-any.whl {where} --worker=all --quiet",
        f"gcloud compute tpus tpu-vm ssh tri {where} --worker=all --quiet '--command={SETUP}'",
        f"gcloud compute tpus tpu-vm ssh tri {where} --worker=all --quiet '--command={PY} -m strokes_jax pod worker "
        f"start --job first --kill-stale -- {PY} -m strokes_jax train --workdir gs://my-bucket/tri "
        f"--config shapes_tiny'",
    ]
    code, out, _ = _pod(capsys, "down", "--dry-run", *V6E)
    assert out.splitlines() == [f"gcloud compute tpus queued-resources delete tri {where} --force --quiet"]
    # Spot through a queued resource is in the GA command group.
    code, out, _ = _pod(capsys, "up", "--dry-run", "--name", "tri", "--accelerator", "v6e-32", "--zone",
                        "europe-west4-a", "--capacity", "spot", "--queued")
    assert out.splitlines()[1] == (f"gcloud compute tpus queued-resources create tri {where} --node-id=tri "
                                   f"--accelerator-type=v6e-32 --runtime-version=v2-alpha-tpuv6e --spot")
    assert fake.calls() == []


def test_a_dry_run_without_wheel_shows_the_build(fake, capsys):
    code, out, _ = _pod(capsys, "run", "--dry-run", *V5P, "--workdir", "gs://my-bucket/exp1")
    assert code == 0
    first = out.splitlines()[0]
    assert first.startswith("# ") and "-m pip wheel" in first and "--no-deps" in first


def test_dry_run_of_ssh_logs_and_a_sweep_on_a_slice_per_point(fake, capsys):
    code, out, _ = _pod(capsys, "ssh", "--dry-run", *V5P, "--worker", "3", "--", "ls", "-la")
    assert out.splitlines() == ["gcloud compute tpus tpu-vm ssh exp --zone=us-east5-a --project=my-proj --worker=3 "
                                "'--command=ls -la'"]
    code, _, err = _pod(capsys, "ssh", "--dry-run", *V5P, "--worker", "16")
    assert code == exits.BAD_INPUT and err.strip() == "error: --worker 16: all or 0..15"
    code, out, _ = _pod(capsys, "logs", "--dry-run", *V5P, "--job", "exp1", "--follow")
    assert out.splitlines() == ["gcloud compute tpus tpu-vm ssh exp --zone=us-east5-a --project=my-proj --worker=all "
                                f"'--command={PY} -m strokes_jax pod worker logs --job exp1 --lines 100 --follow'"]
    code, out, err = _pod(capsys, "sweep", "--dry-run", *V5P, "--config", "shapes_tiny:test", "--workdir",
                          "gs://my-bucket/lr", "--wheel", WHEEL, "--slices", "per-point")
    assert code == 0, err
    lines = out.splitlines()
    assert [line for line in lines if " create " in line] == [
        f"gcloud compute tpus tpu-vm create exp-{i} --zone=us-east5-a --project=my-proj --accelerator-type=v5p-128 "
        f"--version=v2-alpha-tpuv5 --spot" for i in range(3)]
    assert sum("pod worker start --job lr.lr=0.001 --" in line and "ssh exp-1 " in line for line in lines) == 1
    assert fake.calls() == []


# ---- checked before anything runs -------------------------------------------------------

@pytest.mark.parametrize("text, workers, runtime", [
    ("v5p-128", 16, "v2-alpha-tpuv5"), ("v5p-8", 1, "v2-alpha-tpuv5"), ("v5p-384", 48, "v2-alpha-tpuv5"),
    ("v6e-32", 8, "v2-alpha-tpuv6e"), ("v6e-8", 1, "v2-alpha-tpuv6e"), ("v5litepod-16", 4, "v2-alpha-tpuv5-lite"),
    ("v4-32", 4, "tpu-ubuntu2204-base"),
])
def test_accelerators(text, workers, runtime):
    acc = spec.accelerator(text)
    assert (acc.workers, acc.runtime) == (workers, runtime)


@pytest.mark.parametrize("text, message", [
    ("v5p-12", "--accelerator v5p-12: v5p-N takes N = 8, 16, 32, 64, 128, then multiples of 128 up to 12288"),
    ("v5p-200", "v5p-N takes N ="), ("v6e-3", "--accelerator v6e-3: v6e-N takes N = 1, 4, 8, 16"),
    ("v6e-512", "v6e-N takes N"), ("v4-7", "v4-N takes N"),
    ("v5e-16", "v5e is spelled v5litepod-N"), ("v7-8", "one of v4-N, v5p-N, v5litepod-N, v6e-N"),
    ("tpu", "one of v4-N"),
])
def test_bad_accelerators(text, message):
    with pytest.raises(spec.PodError, match=message.replace("(", r"\(").replace("+", r"\+")):
        spec.accelerator(text)


def test_a_local_workdir_is_refused_for_a_multi_host_slice(fake, capsys):
    code, out, err = _pod(capsys, "run", "--name", "exp", "--accelerator", "v5p-128", "--zone", "us-east5-a",
                          "--workdir", "runs/exp1", "--wheel", WHEEL, "--", "--config", "shapes_tiny")
    assert code == exits.BAD_INPUT
    assert err.strip().splitlines() == ["error: --workdir runs/exp1: a v5p-128 slice has 16 workers, which must "
                                        "share one workdir: give a gs://BUCKET/PATH"]
    assert fake.calls() == []
    # One host may keep it on its own disk.
    code, out, err = _pod(capsys, "run", "--dry-run", "--name", "one", "--accelerator", "v6e-8", "--zone",
                          "us-east5-a", "--workdir", "runs/exp1", "--wheel", WHEEL)
    assert code == 0 and "--workdir runs/exp1" in out


@pytest.mark.parametrize("extra, message", [
    (["--", "--config", "shapes_tiny", "--config.optim.lrr=1"],
     "error: training command: unknown config key optim.lrr (did you mean optim.lr?)"),
    (["--", "--config", "shapes_tiny", "--config.train.steps=-1"],
     "error: training command: config key train.steps: -1 is not a whole number >= 0"),
    (["--", "--config", "nope"], "error: --config nope: config file not found"),
    (["--", "--workdir", "gs://my-bucket/y"], "error: --workdir goes before `--`"),
    (["--zone", "us-east5"], "error: --zone 'us-east5': a zone such as"),
    (["--capacity", "best-effort", "--queued", "--valid-until-duration", "soon"],
     "error: --valid-until-duration 'soon': a duration such as 6h"),
    (["--valid-until-duration", "6h"], "error: --valid-until-duration: only a queued request expires"),
    (["--job", "../x"], "error: --job '../x'"),
])
def test_bad_input_is_one_line_and_runs_nothing(fake, capsys, extra, message):
    args = ["run", "--name", "exp", "--accelerator", "v5p-16", "--zone", "us-east5-a", "--workdir",
            "gs://my-bucket/x", "--wheel", WHEEL]
    if extra[0] == "--zone":
        args[args.index("us-east5-a")] = extra[1]
        extra = []
    code, _, err = _pod(capsys, *args, *extra)
    assert code == exits.BAD_INPUT, err
    assert len(err.strip().splitlines()) == 1 and err.startswith(message), err
    assert fake.calls() == []


def test_a_config_file_of_ones_own_travels_with_the_job(fake, capsys, tmp_path):
    (tmp_path / "mine.py").write_text("from strokes_jax.configs import shapes_tiny\n\n"
                                      "def get_config(arg=None):\n    return shapes_tiny.get_config('test')\n")
    code, out, err = _pod(capsys, "run", "--dry-run", *V5P, "--workdir", "gs://my-bucket/m", "--wheel", WHEEL,
                          "--", "--config", f"{tmp_path / 'mine.py'}:x", "--config.optim.lr=0.01")
    assert code == 0, err
    lines = out.splitlines()
    assert f"scp {tmp_path / 'mine.py'} exp:strokes_pod/configs/mine.py" in lines[3]
    assert "--config strokes_pod/configs/mine.py:x --config.optim.lr=0.01" in lines[4]


# ---- against the stand-in gcloud ----------------------------------------------------------

SLICE = ["--name", "exp", "--accelerator", "v5p-16", "--zone", "us-east5-a", "--project", "my-proj"]


def test_up_run_down_on_a_two_worker_slice(fake, capsys, monkeypatch):
    fake.scenario(workers=2, rules=[{"match": ["tpu-vm describe"], "replies": [
        {"rc": 1, "stderr": "ERROR: (gcloud.compute.tpus.tpu-vm.describe) NOT_FOUND: Resource exp not found\n"},
        {"emulate": True}]}])
    monkeypatch.setenv("FAKE_TRAIN_SECONDS", "0.5")
    code, out, err = _pod(capsys, "up", *SLICE)
    assert code == 0, err
    assert fake.state()["pods"]["exp"]["spec"]["accelerator"] == "v5p-16"
    code, out, err = _pod(capsys, "run", "--workdir", "gs://my-bucket/exp1", "--wheel", WHEEL, "--poll", "0.2",
                          "--", "--config", "shapes_tiny:test")
    assert code == 0, out + err
    assert "exp1: started on 2 of 2 workers" in out and "exp1: done (every worker exited 0)" in out
    verbs = [c[2:4] for c in fake.calls()]
    assert verbs[:6] == [["tpu-vm", "describe"], ["tpu-vm", "create"], ["tpu-vm", "describe"],
                         ["tpu-vm", "scp"], ["tpu-vm", "ssh"], ["tpu-vm", "ssh"]]
    assert all("--zone=us-east5-a" in c and "--project=my-proj" in c for c in fake.calls())
    for w in (0, 1):  # each worker ran the training command once, from its own home folder
        log = (fake.path / f"worker{w}/strokes_pod/jobs/exp1/log.txt").read_text()
        assert f"fake train -m strokes_jax train --workdir gs://my-bucket/exp1 --config shapes_tiny:test env {w}" \
            in log
        assert (fake.path / f"worker{w}/train_runs").read_text() == "1"
    job = fake.state()["pods"]["exp"]["job"]
    assert job["job"] == "exp1" and job["status"] == "done" and job["workdir"] == "gs://my-bucket/exp1"
    code, out, err = _pod(capsys, "logs", "--lines", "2")
    assert code == 0 and "[worker 0] finished with 0" in out and "[worker 1] # exit code 0" in out
    code, out, err = _pod(capsys, "down")
    assert code == 0 and fake.calls()[-1][2:5] == ["tpu-vm", "delete", "exp"]
    assert "exp" not in fake.state()["pods"]


def test_a_transient_failure_is_retried_up_to_the_bound(fake, capsys):
    fake.scenario(rules=[{"match": ["tpu-vm create"], "replies": [
        {"rc": 1, "stderr": "ERROR: (gcloud.compute.tpus.tpu-vm.create) UNAVAILABLE: The service is "
                            "currently unavailable.\n"}]},
        {"match": ["tpu-vm describe"], "replies": [{"rc": 1, "stderr": "ERROR: NOT_FOUND: exp\n"}]}])
    code, out, err = _pod(capsys, "up", *SLICE, "--retries", "2", "--backoff", "0")
    assert code == exits.FAILED
    assert [c[3] for c in fake.calls()].count("create") == 3
    last = err.strip().splitlines()[-1]
    assert last == ("error: gcloud compute tpus tpu-vm create exp: still failing after 3 attempts: ERROR: "
                    "(gcloud.compute.tpus.tpu-vm.create) UNAVAILABLE: The service is currently unavailable.")
    assert err.count("transient failure") == 2


def test_a_transient_failure_then_success(fake, capsys):
    busy = {"rc": 1, "stderr": "ERROR: (gcloud.compute.tpus.tpu-vm.create) There is no more capacity in the zone\n"}
    fake.scenario(rules=[{"match": ["tpu-vm create"], "replies": [busy, busy, {"rc": 0}]},
                         {"match": ["tpu-vm describe"], "replies": [{"rc": 1, "stderr": "ERROR: NOT_FOUND: exp\n"}]}])
    code, out, err = _pod(capsys, "up", *SLICE, "--backoff", "0")
    assert code == 0, err
    assert [c[3] for c in fake.calls()].count("create") == 3


def test_a_bad_argument_is_not_retried(fake, capsys):
    fake.scenario(rules=[{"match": ["tpu-vm create"], "replies": [
        {"rc": 2, "stderr": "ERROR: (gcloud.compute.tpus.tpu-vm.create) argument --version: expected one argument\n"}]},
        {"match": ["tpu-vm describe"], "replies": [{"rc": 1, "stderr": "ERROR: NOT_FOUND: exp\n"}]}])
    code, out, err = _pod(capsys, "up", *SLICE, "--backoff", "0")
    assert code == exits.BAD_INPUT
    assert [c[3] for c in fake.calls()].count("create") == 1
    assert err.strip().splitlines() == ["error: gcloud compute tpus tpu-vm create exp: rejected, not retried: ERROR: "
                                        "(gcloud.compute.tpus.tpu-vm.create) argument --version: expected one "
                                        "argument"]
    fake.scenario(rules=[{"match": ["tpu-vm create"], "replies": [
        {"rc": 1, "stderr": "ERROR: (gcloud.compute.tpus.tpu-vm.create) INVALID_ARGUMENT: Invalid accelerator\n"}]},
        {"match": ["tpu-vm describe"], "replies": [{"rc": 1, "stderr": "ERROR: NOT_FOUND: exp\n"}]}])
    code, out, err = _pod(capsys, "up", *SLICE, "--backoff", "0")
    assert code == exits.BAD_INPUT and [c[3] for c in fake.calls()].count("create") == 2


@pytest.mark.parametrize("rc, stderr, kind", [
    (0, "", "ok"), (2, "ERROR: unrecognized arguments: --bogus", "bad"),
    (1, "ERROR: RESOURCE_EXHAUSTED: Quota 'TPUV5P' exceeded. Limit: 0", "bad"),
    (1, "ERROR: RESOURCE_EXHAUSTED: no more capacity", "transient"),
    (255, "ssh: connect to host 10.0.0.2 port 22: Connection timed out", "transient"),
    (1, "ERROR: (gcloud.compute.tpus.tpu-vm.ssh) [/usr/bin/ssh] exited with return code [255].", "transient"),
    (1, "ERROR: HttpError: code=503, message=backend unavailable", "transient"),
    (1, "ERROR: NOT_FOUND: Resource 'exp' was not found", "not_found"),
    (1, "ERROR: ALREADY_EXISTS: exp", "exists"),
    (1, "ERROR: something nobody expected", "failed"),
    (1, "step 500 loss 0.1", "failed"),
])
def test_failures_are_classified(rc, stderr, kind):
    assert gcloud.classify(rc, stderr) == kind


def test_the_reason_is_the_line_that_says_why():
    ssh = "ERROR: (gcloud.compute.tpus.tpu-vm.ssh) [/usr/bin/ssh] exited with return code [127]."
    assert gcloud.reason(f"Warning: added host key\n{ssh}\n", 1) == ssh
    missing = "bash: line 1: /home/u/strokes_pod/venv/bin/python: No such file or directory"
    assert gcloud.reason(f"{missing}\n{ssh}\n", 1) == missing
    assert gcloud.reason("", 3) == "exit code 3"


def test_preempted_job_then_a_rerun_resumes(fake, capsys, monkeypatch):
    fake.scenario(workers=2)
    monkeypatch.setenv("FAKE_TRAIN_RCS", "75,0")
    code, out, err = _pod(capsys, "run", *SLICE, "--workdir", "gs://my-bucket/exp1", "--wheel", WHEEL,
                          "--poll", "0.2", "--", "--config", "shapes_tiny:test")
    assert code == exits.PREEMPTED, out + err
    assert "preempted (exit code 75: checkpoint saved); rerun the same `pod run`" in out
    assert fake.state()["pods"]["exp"]["job"]["status"] == "preempted"
    code, out, err = _pod(capsys, "run", "--workdir", "gs://my-bucket/exp1", "--no-install", "--poll", "0.2",
                          "--", "--config", "shapes_tiny:test")
    assert code == 0, out + err
    log = (fake.path / "worker1/strokes_pod/jobs/exp1/log.txt").read_text()
    assert log.count("--workdir gs://my-bucket/exp1") == 4  # two runs, each its $ line and its own echo
    assert "# exit code 75" in log and log.rstrip().endswith("# exit code 0")


def test_a_lost_slice_reads_as_preempted(fake, capsys):
    fake.scenario(workers=2, rules=[{"match": ["worker status"], "replies": [
        {"rc": 255, "stderr": "ssh: connect to host 10.1.0.3 port 22: Connection refused\n"}]},
        {"match": ["tpu-vm describe"], "replies": [{"emulate": True}, {"rc": 0, "stdout": "PREEMPTED\n"}]}])
    code, out, err = _pod(capsys, "run", *SLICE, "--workdir", "gs://my-bucket/exp1", "--wheel", WHEEL,
                          "--poll", "0", "--retries", "1", "--backoff", "0", "--", "--config", "shapes_tiny:test")
    assert code == exits.PREEMPTED, out + err
    assert "slice exp is PREEMPTED" in out
    # Without --up a rerun says what to do; with it the slice is replaced first.
    code, out, err = _pod(capsys, "run", "--workdir", "gs://my-bucket/exp1", "--wheel", WHEEL)
    assert code == exits.FAILED and "slice exp is PREEMPTED: `pod up` creates it (or add --up)" in err


def test_reattach_after_the_launcher_is_killed(fake, tmp_path):
    fake.scenario(workers=2)
    env = dict(os.environ, FAKE_TRAIN_SECONDS="6")
    pod = [sys.executable, "-m", "strokes_jax", "pod"]
    launcher = subprocess.Popen(pod + ["run", *SLICE, "--workdir", "gs://my-bucket/exp1", "--wheel", WHEEL,
                                       "--poll", "0.3", "--", "--config", "shapes_tiny:test"],
                                env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    while True:  # until the workers have the job
        assert launcher.poll() is None, launcher.stdout.read()
        st = json.loads((tmp_path / "state.json").read_text()) if (tmp_path / "state.json").exists() else {}
        if st.get("pods", {}).get("exp", {}).get("job", {}).get("status") == "running":
            break
        time.sleep(0.1)
    launcher.send_signal(signal.SIGKILL)
    launcher.wait()
    # A new launcher knows the slice, its zone and project, and the job from the state file alone.
    r = subprocess.run(pod + ["status"], env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "exp: READY (v5p-16, 2 workers, on-demand, us-east5-a)" in r.stdout
    assert "job exp1: running (2 of 2 workers running)" in r.stdout
    status_call = fake.calls()[-1]
    assert status_call[:5] == ["compute", "tpus", "tpu-vm", "ssh", "exp"] and "--project=my-proj" in status_call
    # A rerun reattaches instead of starting a second copy, and follows the job to its end.
    r = subprocess.run(pod + ["run", "--workdir", "gs://my-bucket/exp1", "--no-install", "--poll", "0.3", "--",
                              "--config", "shapes_tiny:test"], env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "already running, reattached" in r.stdout and "exp1: done" in r.stdout
    for w in (0, 1):
        assert (fake.path / f"worker{w}/train_runs").read_text() == "1"


def test_stop_and_a_busy_slice(fake, capsys, monkeypatch):
    fake.scenario(workers=1)
    monkeypatch.setenv("FAKE_TRAIN_SECONDS", "30")
    one = ["--name", "one", "--accelerator", "v6e-8", "--zone", "us-east5-a"]
    code, out, err = _pod(capsys, "run", *one, "--workdir", "gs://my-bucket/a", "--wheel", WHEEL, "--detach")
    assert code == 0, err
    code, out, err = _pod(capsys, "run", "--workdir", "gs://my-bucket/b", "--no-install", "--detach")
    assert code == exits.FAILED
    assert "strokes-pod-error worker 0: job a is running here (`pod stop --job a` ends it)" in err
    code, out, err = _pod(capsys, "stop", "--job", "a")
    assert code == 0
    for _ in range(300):  # until the job has saved and exited
        code, out, err = _pod(capsys, "status")
        if "exited" in out:
            break
        time.sleep(0.1)
    assert "job a: preempted" in out or "exit code 75" in out, out
    assert "preempted at step 3" in (fake.path / "worker0/strokes_pod/jobs/a/log.txt").read_text()


def test_a_sweep_runs_its_points_in_turn_and_a_rerun_skips_them(fake, capsys):
    fake.scenario(workers=1)
    one = ["--name", "one", "--accelerator", "v6e-8", "--zone", "us-east5-a"]
    code, out, err = _pod(capsys, "sweep", *one, "--config", "shapes_tiny:test", "--workdir", "gs://my-bucket/lr",
                          "--wheel", WHEEL, "--poll", "0.2", "--config.train.tb_images=0")
    assert code == 0, out + err
    runs = [line for line in (fake.path / "worker0/strokes_pod/jobs/lr.lr=0.001/log.txt").read_text().splitlines()
            if line.startswith("fake train")]
    assert runs == ["fake train -m strokes_jax train --workdir gs://my-bucket/lr/lr=0.001 --config shapes_tiny:test "
                    "--config.train.tb_images=0 --config.optim.lr=0.001 env 0"]
    assert (fake.path / "worker0/train_runs").read_text() == "3"
    rec = fake.state()["sweeps"]["gs://my-bucket/lr"]
    assert [p["status"] for p in rec["points"]] == ["done"] * 3
    record = json.loads(open(os.path.join(os.path.dirname(os.environ["STROKES_POD_STATE"]), "sweeps",
                                          "gs___my-bucket_lr", "sweep.json")).read())
    assert [p["name"] for p in record["points"]] == ["lr=0.0003", "lr=0.001", "lr=0.003"]
    code, out, err = _pod(capsys, "sweep", "--config", "shapes_tiny:test", "--workdir", "gs://my-bucket/lr",
                          "--no-install", "--config.train.tb_images=0")
    assert code == 0 and out.count("done before, skipped") == 3
    assert (fake.path / "worker0/train_runs").read_text() == "3"


# ---- the worker side ---------------------------------------------------------------------

def test_the_multi_host_start_comes_from_the_vm_metadata():
    meta = {"worker-network-endpoints": "unused:w0:10.0.0.2,unused:w1:10.0.0.3", "agent-worker-number": "1"}.get
    assert worker.jax_env({}, meta) == {"JAX_COORDINATOR_ADDRESS": "10.0.0.2:8476", "JAX_NUM_PROCESSES": "2",
                                        "JAX_PROCESS_ID": "1"}
    assert worker.endpoints("t1v-a-w-0,t1v-a-w-1") == ["t1v-a-w-0", "t1v-a-w-1"]
    assert worker.jax_env({}, {"worker-network-endpoints": "10.0.0.2", "agent-worker-number": "0"}.get) == {}
    assert worker.jax_env({"TPU_WORKER_HOSTNAMES": "a,b"}, meta) == {}  # the environment already says
    assert worker.jax_env({}, lambda key: None) == {}  # not a TPU VM


def test_a_new_job_kills_stale_holders_of_the_tpu(tmp_path):
    if not shutil.which("lsof"):
        pytest.skip("no lsof here")
    device = tmp_path / "accel0"
    device.write_text("")
    lock = tmp_path / "libtpu_lockfile"
    lock.write_text("")
    holder = subprocess.Popen([sys.executable, "-c", f"import time; f = open({str(device)!r}); print('ok', "
                               f"flush=True); time.sleep(60)"], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "ok"
        assert worker.kill_stale([str(device)], lock=str(lock)) == [holder.pid]
        assert holder.wait(timeout=10) == -signal.SIGKILL and not lock.exists()
        assert worker.kill_stale([str(device)], lock=str(lock)) == []  # nobody holds it now
    finally:
        holder.kill()
    assert worker.kill_stale([]) == []  # not a TPU VM: nothing asked


def test_a_reattach_kills_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    killed, started = [], []
    monkeypatch.setattr(worker, "kill_stale", lambda: killed.append(1) or [4242])
    monkeypatch.setattr(worker.subprocess, "Popen", lambda *a, **k: started.append(a) or type("P", (), {"pid": 1})())
    monkeypatch.setattr(worker, "_running_jobs", lambda: ["exp1"])
    assert worker.start("exp1", ["train"], stale=True) == 0
    assert worker.start("exp2", ["train"], stale=True) == worker.BUSY  # another job of the launcher: kept too
    assert killed == [] and started == []
    monkeypatch.setattr(worker, "_running_jobs", lambda: [])
    assert worker.start("exp1", ["train"], stale=True) == 0
    assert killed == [1] and len(started) == 1
    assert "killed stale holders of the TPU: pid 4242" in (tmp_path / "strokes_pod/jobs/exp1/log.txt").read_text()


def test_judging_the_workers():
    run = {"state": "running", "rc": None}
    assert jobs.judge([{"worker": 0, **run}, {"worker": 1, "state": "exited", "rc": 0}])[0] == "running"
    assert jobs.judge([{"worker": 0, "state": "exited", "rc": 0}] * 2) == ("done", "every worker exited 0")
    assert jobs.judge([{"worker": 0, "state": "exited", "rc": 75}, {"worker": 1, "state": "exited", "rc": 0}])[0] \
        == "preempted"
    verdict, why = jobs.judge([{"worker": 0, **run}, {"worker": 3, "state": "exited", "rc": 1}])
    assert verdict == "failed" and why.startswith("worker 3 exited with code 1; 1 still running")
    assert jobs.judge([{"worker": 0, "state": "none", "rc": None}])[0] == "missing"


def test_pod_help_imports_no_jax(tmp_path):
    poison = tmp_path / "poison"
    for name in ("jax", "tensorflow"):
        (poison / name).mkdir(parents=True)
        (poison / name / "__init__.py").write_text(f"raise ImportError('{name} imported')\n")
    env = dict(os.environ, PYTHONPATH=str(poison), STROKES_POD_STATE=str(tmp_path / "s.json"))
    r = subprocess.run([sys.executable, "-m", "strokes_jax", "pod", "--help"], capture_output=True, text=True, env=env)
    assert r.returncode == 0 and "run a job on every worker" in r.stdout, r.stderr
    r = subprocess.run([sys.executable, "-m", "strokes_jax", "pod", "run", "--dry-run", *SLICE, "--workdir",
                        "gs://my-bucket/x", "--", "--config", "shapes_tiny"], capture_output=True, text=True, env=env,
                       cwd=tmp_path)
    assert r.returncode == 0 and "worker start --job x" in r.stdout, r.stderr


# ---- a multi-GPU machine -----------------------------------------------------------------

def test_host_one_process_sees_every_gpu(fake, capsys):
    code, out, err = _pod(capsys, "host", "--dry-run", "--workdir", "runs/exp", "--", "--config", "shapes_tiny")
    assert code == 0, err
    assert out.splitlines() == [f"env {sys.executable} -m strokes_jax train --workdir runs/exp --config shapes_tiny"]


def test_host_one_process_per_gpu_pair_over_ssh(fake, capsys, tmp_path):
    code, out, err = _pod(capsys, "host", "--dry-run", "--host", "me@gpubox", "--gpus", "4,5,6,7",
                          "--gpus-per-process", "2", "--port", "9999", "--cd", "work", "--workdir", "runs/exp",
                          "--", "--config", "shapes_tiny", "--config.optim.lr=0.01")
    assert code == 0, err
    logs = tmp_path / "hosts" / "exp"
    assert out.splitlines() == [
        "ssh -o BatchMode=yes me@gpubox 'cd work && exec env CUDA_VISIBLE_DEVICES=4,5 "
        "JAX_COORDINATOR_ADDRESS=localhost:9999 JAX_NUM_PROCESSES=2 JAX_PROCESS_ID=0 python3 -m strokes_jax train "
        "--workdir runs/exp --config shapes_tiny --config.optim.lr=0.01'",
        "ssh -o BatchMode=yes me@gpubox 'cd work && exec env CUDA_VISIBLE_DEVICES=6,7 "
        "JAX_COORDINATOR_ADDRESS=localhost:9999 JAX_NUM_PROCESSES=2 JAX_PROCESS_ID=1 python3 -m strokes_jax train "
        f"--workdir runs/exp --config shapes_tiny --config.optim.lr=0.01'  # > {logs}/process-1.log",
    ]
    job = host.HostJob(host="local", workdir="w", gpus=host.parse_gpus("8"), gpus_per_process=1).checked()
    assert job.processes == 8
    assert job.env(5) == {"CUDA_VISIBLE_DEVICES": "5", "JAX_COORDINATOR_ADDRESS": "localhost:8476",
                          "JAX_NUM_PROCESSES": "8", "JAX_PROCESS_ID": "5"}
    assert host.HostJob(host="local", workdir="w", gpus=("0", "1")).env(0) == {"CUDA_VISIBLE_DEVICES": "0,1"}


@pytest.mark.parametrize("args, message", [
    (["--gpus-per-process", "2"], "error: --gpus-per-process: needs --gpus"),
    (["--gpus", "6", "--gpus-per-process", "4"], "error: --gpus-per-process 4: does not divide the 6 GPUs"),
    (["--gpus", "0,0"], "error: --gpus '0,0': a count"),
    (["--host=-oProxyCommand=x"], "error: --host '-oProxyCommand=x'"),
    (["--", "--config", "shapes_tiny", "--config.optim.lrr=1"], "error: training command: unknown config key"),
])
def test_host_bad_input(fake, capsys, args, message):
    cut = args.index("--") if "--" in args else len(args)
    code, out, err = _pod(capsys, "host", "--dry-run", "--workdir", "runs/x", *args[:cut], *args[cut:])
    assert code == exits.BAD_INPUT and err.startswith(message), err


def test_host_runs_the_processes_and_stops_the_rest_when_one_fails(tmp_path, monkeypatch):
    script = tmp_path / "fake_python"
    script.write_text("#!/bin/bash\necho \"process $JAX_PROCESS_ID of $JAX_NUM_PROCESSES on GPUs "
                      "$CUDA_VISIBLE_DEVICES: $*\"\n"
                      "trap 'echo saved; exit 75' TERM\n"
                      "if [ \"$JAX_PROCESS_ID\" = \"$FAIL\" ]; then exit 1; fi\n"
                      "for i in $(seq 50); do sleep 0.1; done\n")
    script.chmod(0o755)
    job = host.HostJob(host="local", workdir="w", train_args=("--config", "shapes_tiny"), gpus=("0", "1", "2", "3"),
                       gpus_per_process=2, python=str(script))
    monkeypatch.setenv("FAIL", "none")
    t = time.time()
    assert host.run(job, str(tmp_path / "logs"), poll=0.05) == exits.OK
    log = (tmp_path / "logs/process-1.log").read_text()
    assert log.startswith("process 1 of 2 on GPUs 2,3: -m strokes_jax train --workdir w --config shapes_tiny")
    monkeypatch.setenv("FAIL", "1")
    t = time.time()
    assert host.run(job, str(tmp_path / "logs2"), poll=0.05) == exits.FAILED
    assert time.time() - t < 4  # process 0 was stopped, not waited for
