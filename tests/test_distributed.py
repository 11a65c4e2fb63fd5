"""Sharded and multi-process training, preemption and faults, in fresh interpreters
(tests/distributed_driver.py): XLA_FLAGS and jax.distributed must be set before JAX starts.

* the same tiny run on meshes (8,1,1), (2,4,1), (2,2,2) of 8 forced CPU devices gives the
  one-device losses, and the parameters really are split;
* two processes (jax.distributed on localhost, gloo CPU collectives) match one process;
* SIGTERM mid-run saves and exits; the restarted run continues with exactly the losses of
  an uninterrupted run;
* a process killed inside a checkpoint save leaves the previous checkpoint restorable.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
DRIVER = os.path.join(HERE, "distributed_driver.py")
sys.path.insert(0, HERE)
import distributed_driver  # noqa: E402

pytestmark = pytest.mark.multiprocess

STEPS = 4


def _env(devices=None):
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)
    if devices:
        env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    env["PYTHONUNBUFFERED"] = "1"
    return env


# No wall-clock limits: on a loaded 2-core machine a subprocess may take many minutes, and a
# stuck one shows as a stuck test.
def _run(args, devices=None):
    p = subprocess.run([sys.executable, DRIVER, *args], env=_env(devices), capture_output=True,
                       text=True)
    assert p.returncode == 0, p.stderr[-3000:]
    return p


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("data"))
    distributed_driver.sources(distributed_driver.config(), d)  # build once, before workers
    return d


@pytest.fixture(scope="module")
def meshes(data_dir, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("meshes") / "out.json")
    _run(["meshes", out, data_dir, "1,1,1", "8,1,1", "2,4,1", "2,2,2"], devices=8)
    return json.load(open(out))


def test_meshes_give_the_single_device_losses(meshes):
    base = meshes["1,1,1"]["losses"]
    assert len(base) == STEPS and base[-1] < base[0]
    for shape in ("8,1,1", "2,4,1", "2,2,2"):
        np.testing.assert_allclose(meshes[shape]["losses"], base, rtol=2e-5, err_msg=shape)


def test_parameters_are_really_split(meshes):
    # q kernel [embed 32, heads 2, head_dim 16]: embed over fsdp, heads over tensor.
    assert meshes["1,1,1"]["q_shard_shape"] == [32, 2, 16]
    assert meshes["8,1,1"]["q_shard_shape"] == [32, 2, 16]  # pure data parallel: replicated
    assert meshes["2,4,1"]["q_shard_shape"] == [8, 2, 16]
    assert meshes["2,2,2"]["q_shard_shape"] == [16, 1, 16]
    from strokes_jax.sequence.tokenizer import Tokenizer
    vocab = Tokenizer.shapes().vocab_size  # padded to a multiple of 8, so tensor=2 divides it
    assert meshes["2,2,2"]["embed_shard_shape"] == [vocab // 2, 16]  # vocab over tensor, embed over fsdp


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_match_one(meshes, data_dir, tmp_path):
    port, work = _free_port(), str(tmp_path / "run")
    procs = [subprocess.Popen([sys.executable, DRIVER, "worker", str(tmp_path / f"w{i}.json"),
                               data_dir, work, str(port), str(i), "2"], env=_env(),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for i in range(2)]
    outs = [p.communicate()[0] for p in procs]
    for p, o in zip(procs, outs):
        assert p.returncode == 0, o[-3000:]
    res = [json.load(open(tmp_path / f"w{i}.json")) for i in range(2)]
    assert [r["process"] for r in res] == [0, 1] and res[0]["devices"] == 2
    for r in res:
        np.testing.assert_allclose(r["losses"], meshes["1,1,1"]["losses"], rtol=2e-5)
    # Each process wrote its own input-state file into the shared checkpoint.
    files = sorted(f for f in os.listdir(os.path.join(work, "checkpoints", str(STEPS), "data"))
                   if f.startswith("process_"))
    assert files == ["process_0-of-2.json", "process_1-of-2.json"]


def _start_train(tmp_path, tag, work, data_dir, slow_from=None):
    args = [sys.executable, DRIVER, "train", str(tmp_path / f"{tag}.json"), data_dir, work, str(STEPS)]
    if slow_from is not None:
        args.append(str(slow_from))
    return subprocess.Popen(args, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)


def _wait_for(proc, predicate):
    """Reads the process's output until a line satisfies `predicate` (progress, not a clock);
    fails if the process ends first."""
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if predicate(line):
            return seen
    raise AssertionError("process ended before the condition:\n" + "".join(seen[-40:]))


@pytest.fixture(scope="module")
def uninterrupted(data_dir, tmp_path_factory):
    """Per-step losses of an uninterrupted run in the same one-device environment as the
    interrupted ones (the 8-forced-device process compiles differently, so its losses match
    only to rounding)."""
    d = tmp_path_factory.mktemp("uninterrupted")
    _run(["train", str(d / "out.json"), data_dir, str(d / "run"), str(STEPS)])
    return [l for _, l in json.load(open(d / "out.json"))["losses"]]


def test_sigterm_then_restart_gives_the_uninterrupted_losses(uninterrupted, data_dir, tmp_path):
    work = str(tmp_path / "run")
    p = _start_train(tmp_path, "a", work, data_dir)
    _wait_for(p, lambda l: l.startswith("step 2/"))
    p.send_signal(signal.SIGTERM)
    out = p.communicate()[0]
    assert p.returncode == 0, out[-3000:]
    first = json.load(open(tmp_path / "a.json"))
    assert first["preempted"] and 2 <= first["end"] < STEPS
    _run(["train", str(tmp_path / "b.json"), data_dir, work, str(STEPS)])
    second = json.load(open(tmp_path / "b.json"))
    assert second["start"] == first["end"] and second["end"] == STEPS
    losses = [l for _, l in first["losses"] + second["losses"]]
    assert losses == uninterrupted  # exactly: same data, state, noise, program


def test_kill_during_save_keeps_the_previous_checkpoint(uninterrupted, data_dir, tmp_path):
    import orbax.checkpoint as ocp
    work = str(tmp_path / "run")
    p = _start_train(tmp_path, "a", work, data_dir, slow_from=3)
    marker = os.path.join(work, "SAVING")
    while not os.path.exists(marker):  # the save of step 3 pauses until it is killed
        assert p.poll() is None, "training ended before saving step 3"
        time.sleep(0.05)
    p.kill()  # SIGKILL inside the save of step 3, before its atomic rename
    p.communicate()
    steps = ocp.CheckpointManager(os.path.join(work, "checkpoints")).all_steps()
    assert max(steps) == 2, steps
    os.remove(marker)
    _run(["train", str(tmp_path / "b.json"), data_dir, work, str(STEPS)])
    second = json.load(open(tmp_path / "b.json"))
    assert second["start"] == 2
    assert [l for _, l in second["losses"]] == uninterrupted[2:]


def test_the_entry_point_starts_two_processes_from_the_environment(tmp_path):
    """`python -m strokes_jax train` with JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES /
    JAX_PROCESS_ID set: jax.distributed starts at the entry point (no test driver), each
    process logs where it stands, and the two-process run trains the one-process losses."""
    common = ["-m", "strokes_jax", "train", "--config", "shapes_tiny:test",
              "--config.data.process_split=rows", "--config.train.tb_images=0",
              "--config.train.log_every=1", "--config.train.steps=4"]
    one = subprocess.run([sys.executable, *common, f"--workdir={tmp_path / 'one'}"], env=_env(),
                         capture_output=True, text=True, cwd=tmp_path)
    assert one.returncode == 0, one.stderr[-3000:]
    port = _free_port()
    procs = []
    for i in range(2):
        env = dict(_env(), JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES="2",
                   JAX_PROCESS_ID=str(i))
        procs.append(subprocess.Popen([sys.executable, *common, f"--workdir={tmp_path / 'two'}"],
                                      env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      text=True, cwd=tmp_path))
    outs = [p.communicate()[0] for p in procs]
    for i, (p, o) in enumerate(zip(procs, outs)):
        assert p.returncode == 0, o[-3000:]
        assert f"process {i}/2: 1 local of 2 cpu devices (explicit start)" in o, o[-3000:]
    losses = {name: [l for _, l in json.load(open(tmp_path / name / "train_record.json"))["losses"]]
              for name in ("one", "two")}
    assert len(losses["one"]) == 4
    np.testing.assert_allclose(losses["two"], losses["one"], rtol=2e-5)


def test_start_mode_reads_the_environment():
    from strokes_jax import distributed
    assert distributed.mode({}) == "single"
    assert distributed.mode({"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "4",
                             "JAX_PROCESS_ID": "0"}) == "explicit"
    assert distributed.mode({"TPU_WORKER_HOSTNAMES": "w0,w1,w2,w3"}) == "detected"
    assert distributed.mode({"TPU_WORKER_HOSTNAMES": "localhost"}) == "single"
    assert distributed.mode({"SLURM_NTASKS": "8"}) == "detected"
    with pytest.raises(ValueError, match="JAX_PROCESS_ID missing"):
        distributed.mode({"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "2"})


def test_sigterm_to_one_process_stops_both_at_the_same_step(tmp_path):
    """A preemption notice to one process of a two-process `train` (started through the entry
    point): JAX's preemption sync point stops both at the same step, both save it and both
    exit 75 (preempted), not 0."""
    from strokes_jax.__main__ import EXIT_PREEMPTED
    port = _free_port()
    common = ["-m", "strokes_jax", "train", "--config", "shapes_tiny:test",
              "--config.data.process_split=rows", "--config.train.tb_images=0",
              "--config.train.log_every=1", "--config.train.steps=100000",
              "--config.train.eval_every=0", "--config.train.checkpoint_every=1000",
              f"--workdir={tmp_path / 'w'}"]
    procs = []
    for i in range(2):
        env = dict(_env(), JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES="2",
                   JAX_PROCESS_ID=str(i))
        procs.append(subprocess.Popen([sys.executable, *common], env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True, cwd=tmp_path))
    head = []
    for line in procs[1].stdout:  # waits on progress, not on a clock
        head.append(line)
        if line.startswith("step 3/"):
            procs[1].send_signal(signal.SIGTERM)
            break
    outs = [procs[0].communicate()[0], "".join(head) + procs[1].communicate()[0]]
    stops = []
    for p, o in zip(procs, outs):
        assert p.returncode == EXIT_PREEMPTED, o[-3000:]
        (stop,) = [int(line.split()[3].rstrip(":")) for line in o.splitlines()
                   if line.startswith("preempted at step")]
        stops.append(stop)
    assert stops[0] == stops[1] >= 3
    assert str(stops[0]) in os.listdir(tmp_path / "w" / "checkpoints")
