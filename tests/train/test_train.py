"""Training: configs and their errors, the chunked loss, CP / TP x CP x DP runs equal to one
process (loss and gradients, float64), checkpoint -> resume (also onto another mesh), SIGTERM,
the CLI with its local launcher, and two torchrun agents as two "nodes".

Parallel runs use simulated meshes (real gloo processes, started once per module); the
single-process references run in this process (a one-rank group that the trainer starts and
destroys).
"""

from __future__ import annotations

import itertools
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from longctx.testing import SimulatedMesh
from longctx.train import Trainer, TrainingInterrupted, chunked_cross_entropy, cross_entropy_sum
from longctx.train.config import TrainConfig, apply_overrides, load_config
from longctx.train.optim import lr_at

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = ROOT / "configs"
TOL = 1e-10


# -- a small float64 run --------------------------------------------------------------------------
def small_values(tmp: Path, syn: Path) -> dict:
    """A small fp64 run: 2 layers, h=32, GQA, 256 tokens, the reference kernel, no logging."""
    return {
        "name": "t",
        "output_dir": str(tmp),
        "model": {"num_layers": 2, "hidden_size": 32, "num_attention_heads": 4,
                  "num_query_groups": 2, "ffn_hidden_size": 48, "seq_length": 256,
                  "vocab_size": 259},
        "data": {"synthetic": {"task": "mixed", "passkey_digits": 5, "num_samples": 64,
                               "min_length": 100, "max_length": 250},
                 "synthetic_path": str(syn)},
        "parallel": {"cp": 1, "kernel": "reference"},
        "optim": {"lr": 1e-2},
        "schedule": {"warmup_steps": 1, "min_lr": 1e-3},
        "train": {"steps": 4, "precision": "fp64", "loss_chunk_size": 40,
                  "micro_batch_size": 1, "grad_accum_steps": 2},
        "logging": {"tensorboard": False, "log_interval": 1},
        "checkpoint": {"enabled": False},
        "eval": {"num_samples": 0},
    }


def small_config(base: dict, *overrides: str) -> TrainConfig:
    return TrainConfig.from_dict(apply_overrides(base, overrides))


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("train")


@pytest.fixture(scope="module")
def base(workdir) -> dict:
    return small_values(workdir, workdir / "synthetic.jsonl")


@pytest.fixture(scope="module")
def mesh4():
    with SimulatedMesh(4) as m:
        yield m


def _grads(model) -> dict[str, torch.Tensor]:
    from torch.distributed.tensor import DTensor

    from longctx.models.llama import _canonical_name

    out = {}
    for name, p in model.named_parameters():
        g = p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad
        out[_canonical_name(name)] = g.detach().clone()
    return out


def _one_step(cfg: TrainConfig):
    """Loss and reduced full gradients of the first step (rank body and reference)."""
    trainer = Trainer(cfg, quiet=True)
    try:
        loss = trainer.forward_backward(trainer.next_micro_batches())
        return loss, _grads(trainer.model)
    finally:
        trainer.close()


def _rank_one_step(group, cfg: TrainConfig):
    return _one_step(cfg)


def _train(cfg: TrainConfig):
    trainer = Trainer(cfg, quiet=True)
    try:
        summary = trainer.train()
        return list(summary.losses), summary.final_step
    finally:
        trainer.close()


def _rank_train(group, cfg: TrainConfig):
    return _train(cfg)


_REFERENCE: dict = {}


def reference_step(cfg: TrainConfig):
    key = repr(cfg)
    if key not in _REFERENCE:
        _REFERENCE[key] = _one_step(cfg)
    return _REFERENCE[key]


def assert_same_step(results, ref, tol=TOL):
    ref_loss, ref_grads = ref
    for loss, grads in results:
        assert abs(loss - ref_loss) < tol, (loss, ref_loss)
        assert grads.keys() == ref_grads.keys()
        errors = {n: float((g - ref_grads[n]).abs().max()) for n, g in grads.items()}
        bad = {n: e for n, e in errors.items() if not e < tol}
        assert not bad, f"gradient errors above {tol}: {bad}"


# -- config ---------------------------------------------------------------------------------------
def test_tiny_yaml_is_the_embedded_default_and_all_configs_load():
    assert load_config(CONFIGS / "tiny.yaml") == TrainConfig()
    cfg = load_config(CONFIGS / "llama_1b_128k.yaml")
    assert (cfg.parallel.cp, cfg.parallel.strategy, cfg.parallel.kernel, cfg.train.precision,
            cfg.model.seq_length, cfg.data.packing.seq_length) == (
        4, "zigzag", "triton", "bf16", 131072, 131072)
    assert cfg.parallel.activation_checkpointing != "none"
    from longctx.models import num_params

    assert 0.9e9 < num_params(cfg.model) < 1.5e9
    big = load_config(CONFIGS / "llama_8b_1m.yaml")
    assert big.model.seq_length == 2**20 and big.parallel.strategy == "hybrid"
    assert big.parallel.tp > 1 and big.parallel.ulysses > 1
    hybrid = load_config(CONFIGS / "hybrid_linear.yaml")
    assert {"linear", "softmax"} == set(hybrid.model.attention_kinds)


def test_overrides_merge_over_yaml_and_defaults():
    cfg = load_config(CONFIGS / "tiny.yaml", ["parallel.cp=2", "optim.lr=3e-4",
                                              "model.seq_length=512", "optim.betas=[0.8, 0.9]"])
    assert (cfg.parallel.cp, cfg.optim.lr, cfg.optim.betas) == (2, 3e-4, (0.8, 0.9))
    assert cfg.data.packing.seq_length == 512  # follows the model
    assert load_config(None, ["model.rotary_base=5e5"]).model.rotary_base == 5e5  # YAML 1.2 float
    assert cfg.model.num_layers == 2  # untouched keys keep the file's values
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg


BAD_CONFIGS = [
    (["optim.lrr=1"], (r"unknown config key 'optim.lrr'; allowed keys in 'optim': betas, eps, "
                       r"lr, weight_decay \(did you mean 'optim.lr'\?\)")),
    (["data.packing.sead=1"], (r"unknown config key 'data.packing.sead'.*did you mean "
                               r"'data.packing.seed'")),
    (["modle.num_layers=1"], r"unknown config key 'modle'; allowed keys at the top level"),
    (["model.num_layers=two"], r"config key 'model.num_layers' must be an int, got 'two'"),
    (["train.clip_grad_norm=yes"], r"'train.clip_grad_norm' must be a number or null"),
    (["train.precision=fp8"], (r"'train.precision' must be one of 'auto', 'bf16', 'fp32', "
                               r"'fp64', got 'fp8'")),
    (["optim.betas=[0.9]"], r"'optim.betas' must be a list of 2 values"),
    (["model.seq_length=1000", "parallel.cp=8"],
     (r"model.seq_length: seq_length=1000 is not a multiple of 16, which the 'zigzag' layout "
      r"over cp_size=8 ranks requires.*e.g. 992 or 1008")),
    (["model.seq_length=1001", "parallel.strategy=ring"], r"not a multiple of 4"),
    (["parallel.strategy=rign"], r"parallel.strategy='rign'; allowed values: \['allgather'"),
    (["parallel.tp=3"], r"tensor parallel size tp=3 must divide model.num_attention_heads=4"),
    (["model.hidden_size=130"],
     r"model.hidden_size=130 is not divisible by num_attention_heads=4"),
    (["data.packing.seq_length=512"],
     r"data.packing.seq_length=512 differs from model.seq_length=1024"),
    (["parallel.kernel=fast"], r"parallel.kernel='fast'; allowed values: \["),
    (["parallel.cp=4", "parallel.ulysses=2"],
     r"parallel.ulysses=2 only applies to strategy 'hybrid'"),
    (["train.micro_batch_size=2", "data.packing.cross_document_attention=true"],
     r"train.micro_batch_size=2 lays sequences end to end"),
    (["model.attention_kinds=[linear,softmax]"],
     (r"linear layers.*sequence must be sharded contiguously; got parallel.strategy='zigzag' "
      r"with layout 'zigzag'. Set parallel.layout=contiguous")),
    (["train.steps=true"], r"config key 'train.steps' must be an int, got True \(bool\)"),
    (["logging.tensorboard=1"], r"'logging.tensorboard' must be true or false, got 1"),
    (["data.dataset.path=a.txt", "data.dataset.pth=b"],
     r"unknown config key 'data.dataset.pth'.*did you mean 'data.dataset.path'"),
    (["data.dataset={text_field: body}"], r"config key 'data.dataset.path' is required"),
    (["optim"], r"--set 'optim': expected KEY=VALUE"),
    (["optim.lr.x=1"], r"'optim.lr' is a value, not a section"),
]


@pytest.mark.parametrize("overrides,match", BAD_CONFIGS)
def test_bad_configs_name_the_key(overrides, match):
    with pytest.raises(ValueError, match=match):
        load_config(CONFIGS / "tiny.yaml", overrides)


@pytest.fixture
def console_logging():
    """The command's console handler for one test (the logger is restored afterwards)."""
    import logging

    from longctx.train.entry import setup_console_logging

    lg = logging.getLogger("longctx")
    saved = (list(lg.handlers), lg.propagate, lg.level)
    setup_console_logging()
    yield
    lg.handlers[:], lg.propagate = saved[0], saved[1]
    lg.setLevel(saved[2])


def test_cli_reports_bad_config_and_missing_file(capsys, console_logging):
    from longctx.cli import main

    assert main(["train", "--set", "optim.lrr=1"]) == 2
    assert "longctx train: error: unknown config key 'optim.lrr'" in capsys.readouterr().err
    assert main(["train", "--config", "no/such.yaml"]) == 2
    assert "config file 'no/such.yaml' does not exist" in capsys.readouterr().err
    assert main(["train", "--print-config", "--set", "parallel.cp=2"]) == 0
    assert "cp: 2" in capsys.readouterr().out


def test_dims_and_world_size_mismatch():
    p = TrainConfig().parallel  # cp=4, dp=null
    assert p.dims(8).dp == 2
    with pytest.raises(ValueError, match="cannot be split into data-parallel groups"):
        p.dims(6)
    p2 = load_config(None, ["parallel.dp=2"]).parallel
    with pytest.raises(ValueError, match=r"dp x cp x tp = 2 x 4 x 1 = 8 but 4 processes"):
        p2.dims(4)


def test_vocab_smaller_than_tokenizer_is_refused(base):
    cfg = small_config(base, "model.vocab_size=200")
    with pytest.raises(ValueError, match=r"model.vocab_size=200 is smaller than the tokenizer's "
                                         r"vocabulary \(259 ids"):
        Trainer(cfg, quiet=True)
    import torch.distributed as dist

    assert not dist.is_initialized()  # the failed trainer released its group


# -- loss and schedule ----------------------------------------------------------------------------
@pytest.mark.parametrize("chunk", [1, 7, 32, 1000])
def test_chunked_loss_equals_full_logits(chunk):
    g = torch.Generator().manual_seed(0)
    N, h, V = 32, 16, 50
    hidden = torch.randn(2, N // 2, h, dtype=torch.float64, generator=g)
    weight = torch.randn(V, h, dtype=torch.float64, generator=g)
    labels = torch.randint(0, V, (2, N // 2), generator=g)
    labels[0, 3] = labels[1, -1] = -100
    results = []
    for fn in (lambda a, b: chunked_cross_entropy(a, b, labels, chunk_size=chunk),
               lambda a, b: cross_entropy_sum(a, b, labels)):
        a = hidden.clone().requires_grad_()
        b = weight.clone().requires_grad_()
        loss = fn(a, b)
        (loss * 0.37).backward()
        results.append((loss.detach(), a.grad, b.grad))
    (l1, ga1, gb1), (l2, ga2, gb2) = results
    assert abs(float(l1 - l2)) < 1e-12
    assert float((ga1 - ga2).abs().max()) < 1e-13 and float((gb1 - gb2).abs().max()) < 1e-13
    assert float(ga1[0, 3].abs().max()) == 0.0  # an unlabelled token gets no gradient
    # gradient for hidden only (a frozen output layer) and no gradient at all
    a = hidden.clone().requires_grad_()
    chunked_cross_entropy(a, weight, labels, chunk_size=chunk).backward()
    assert torch.allclose(a.grad, ga1 / 0.37, atol=1e-13)
    with torch.no_grad():
        assert abs(float(chunked_cross_entropy(hidden, weight, labels, chunk) - l2)) < 1e-12


def test_chunked_loss_bf16_is_close_to_float32():
    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(64, 32, generator=g)
    weight = torch.randn(100, 32, generator=g) * 0.1
    labels = torch.randint(0, 100, (64,), generator=g)
    ref = cross_entropy_sum(hidden, weight, labels)
    got = chunked_cross_entropy(hidden.bfloat16(), weight.bfloat16(), labels, chunk_size=16)
    assert got.dtype == torch.float32 and abs(float(got - ref)) < 1e-2 * float(ref)


def test_lr_schedule_warmup_cosine_min():
    cfg = TrainConfig()
    lrs = [lr_at(s, cfg.optim, cfg.schedule, 100) for s in range(100)]
    assert lrs[0] == pytest.approx(cfg.optim.lr / 10) and lrs[9] == pytest.approx(cfg.optim.lr)
    assert lrs[-1] == pytest.approx(cfg.schedule.min_lr)
    assert all(a >= b for a, b in itertools.pairwise(lrs[9:]))  # decays monotonically
    mid = lrs[9 + 45]
    assert mid == pytest.approx((cfg.optim.lr + cfg.schedule.min_lr) / 2, rel=0.05)


# -- CP == one process ----------------------------------------------------------------------------
CP_CASES = {
    "ring-contiguous": ["parallel.strategy=ring"],
    "zigzag": ["parallel.strategy=zigzag"],
    "striped": ["parallel.strategy=striped"],
    "ulysses": ["parallel.strategy=ulysses"],
    "ring-zigzag-layout": ["parallel.strategy=ring", "parallel.layout=zigzag"],
    "auto": ["parallel.strategy=auto"],
    "hybrid-ulysses2xring2": ["parallel.strategy=hybrid", "parallel.ulysses=2",
                              "parallel.layout=zigzag"],
}


@pytest.mark.parametrize("name", list(CP_CASES))
def test_cp4_equals_one_process(mesh4, base, name):
    """cp=4: the step's loss and every (reduced) gradient equal the one-process run's."""
    cfg = small_config(base, "parallel.cp=4", *CP_CASES[name])
    results = mesh4.run(_rank_one_step, cfg)
    assert_same_step(results, reference_step(small_config(base)))


@pytest.mark.parametrize("fsdp", [False, True], ids=["allreduce", "fsdp"])
def test_dp2_cp2_equals_one_process(mesh4, base, fsdp):
    """dp=2 x cp=2 without accumulation sees the same two samples as one process accumulating
    two micro-batches: same loss, same gradients (FSDP2's reduce-scatter or all-reduce)."""
    cfg = small_config(base, "parallel.cp=2", "parallel.dp=2", "train.grad_accum_steps=1",
                       f"parallel.fsdp={str(fsdp).lower()}")
    results = mesh4.run(_rank_one_step, cfg)
    assert_same_step(results, reference_step(small_config(base)))


def test_micro_batch_of_two_sequences_equals_accumulation(mesh4, base):
    """micro_batch_size=2 (two samples laid end to end, documents kept apart) == accumulation."""
    cfg = small_config(base, "parallel.cp=4", "train.grad_accum_steps=1",
                       "train.micro_batch_size=2")
    results = mesh4.run(_rank_one_step, cfg)
    assert_same_step(results, reference_step(small_config(base)))


def _rank_predictions(group, cfg: TrainConfig):
    trainer = Trainer(cfg, quiet=True)
    try:
        samples = trainer.eval_samples()
        ids = torch.tensor([trainer.dataset.tokenizer.encode(s.text) for s in samples[:1]])
        report = trainer.evaluate(samples)
        return trainer.predict_next_tokens(ids[:, :101]), report
    finally:
        trainer.close()


def test_eval_predictions_under_cp_equal_one_process(mesh4, base):
    """The held-out accuracy runs CP-sharded (padded to the layout's multiple, gathered over
    cp): the same greedy predictions and report as one process."""
    cfg = small_config(base, "eval.num_samples=4")
    ref_pred, ref_report = _rank_predictions(None, cfg)
    assert ref_pred.shape == (1, 101) and ref_report.num_answers > 0
    for strategy in ("zigzag", "striped"):
        cp = small_config(base, "eval.num_samples=4", "parallel.cp=4",
                          f"parallel.strategy={strategy}")
        for pred, report in mesh4.run(_rank_predictions, cp):
            assert torch.equal(pred, ref_pred) and report == ref_report


# -- TP x CP x DP on 8 processes -----------------------------------------------------------------
TP_MESHES = {
    "dp2-cp2-tp2": ["parallel.dp=2", "parallel.cp=2", "train.grad_accum_steps=1"],
    # the 8B config's shape of parallelism: Ulysses inside each TP rank's heads, untied output
    # weights, full recomputation
    "cp4-tp2-ulysses-untied-full-ac": [
        "parallel.cp=4", "parallel.strategy=ulysses", "parallel.activation_checkpointing=full",
    ],
}
TP_MODEL = ["model.num_attention_heads=8", "model.untie_embeddings_and_output_weights=true"]


@pytest.mark.parametrize("name", list(TP_MESHES))
def test_tp2_on_8_processes_matches_one_process(base, name):
    """Two full steps (AdamW included) with tp=2 and FSDP2 on 8 processes: the same losses."""
    model = TP_MODEL if "untied" in name else []
    ref, _ = _train(small_config(base, "train.steps=2", *model))
    cfg = small_config(base, "train.steps=2", "parallel.tp=2", "parallel.fsdp=true", *model,
                       *TP_MESHES[name])
    with SimulatedMesh(8) as mesh8:
        results = mesh8.run(_rank_train, cfg)
    for losses, final_step in results:
        assert final_step == 2
        assert max(abs(a - b) for a, b in zip(losses, ref)) < TOL, (losses, ref)
    assert ref[1] < ref[0]


# -- checkpoint, resume, reshard --------------------------------------------------------------------
def test_resume_equals_uninterrupted_also_on_another_mesh(mesh4, base, workdir):
    """4 steps straight == 2 steps, save, resume, 2 more: bit for bit on the same mesh; within
    float64 rounding on dp=1 x cp=2 x tp=2 (FSDP shards and TP resharded by DCP) and on one
    process (no FSDP, plain tensors)."""
    ck = workdir / "ckpt-a"
    shutil.rmtree(ck, ignore_errors=True)
    mesh = ["parallel.dp=2", "parallel.cp=2", "parallel.fsdp=true", "train.grad_accum_steps=1"]
    straight = small_config(base, *mesh, "checkpoint.enabled=true", f"checkpoint.dir={ck}",
                            "checkpoint.interval=2", "checkpoint.keep=0")
    results = mesh4.run(_rank_train, straight)
    losses = results[0][0]
    assert len(losses) == 4 and all(r[0] == losses for r in results)
    step2 = ck / "step-00000002"
    assert (step2 / "longctx_meta.json").is_file() and (ck / "step-00000004").is_dir()

    def resumed(*more: str) -> str:
        out = workdir / f"ckpt-resumed-{len(os.listdir(workdir))}"
        return ["checkpoint.enabled=true", f"checkpoint.dir={out}", f"checkpoint.resume={step2}",
                *more]

    same = mesh4.run(_rank_train, small_config(base, *mesh, *resumed()))
    assert all(r == (losses[2:], 4) for r in same), (same[0], losses)

    other = small_config(base, "parallel.dp=1", "parallel.cp=2", "parallel.tp=2",
                         "parallel.fsdp=true", "train.grad_accum_steps=2", *resumed())
    for got, final in mesh4.run(_rank_train, other):
        assert final == 4 and max(abs(a - b) for a, b in zip(got, losses[2:])) < TOL

    single, final = _train(small_config(base, *resumed()))  # cp=1, accumulation 2
    assert final == 4 and max(abs(a - b) for a, b in zip(single, losses[2:])) < TOL


def _rank_sigterm(group, cfg: TrainConfig):
    import torch.distributed as dist

    def hook(trainer, metrics):
        if metrics.step == 1 and dist.get_rank() == 1:  # only one rank gets the signal
            os.kill(os.getpid(), signal.SIGTERM)

    trainer = Trainer(cfg, quiet=True)
    try:
        trainer.train(on_step_end=hook)
    except TrainingInterrupted as e:
        return e.step, str(e.checkpoint), e.signal_name
    finally:
        trainer.close()
    return None


def test_sigterm_on_one_rank_saves_a_checkpoint_and_stops_all(mesh4, base, workdir):
    ck = workdir / "ckpt-sigterm"
    cfg = small_config(base, "parallel.cp=4", "train.steps=50", "checkpoint.enabled=true",
                       f"checkpoint.dir={ck}", "checkpoint.interval=0")
    results = mesh4.run(_rank_sigterm, cfg)
    assert all(r == (2, str(ck / "step-00000002"), "SIGTERM") for r in results), results
    assert (ck / "step-00000002" / "longctx_meta.json").is_file()
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # handler restored here too


# -- command line: local launcher, SIGTERM, resume ------------------------------------------------
def _cli_overrides(base: dict, out: Path) -> list[str]:
    m, syn = base["model"], base["data"]["synthetic_path"]
    return [
        f"output_dir={out}", "model.num_layers=2", f"model.hidden_size={m['hidden_size']}",
        f"model.ffn_hidden_size={m['ffn_hidden_size']}", f"model.seq_length={m['seq_length']}",
        f"data.synthetic_path={syn}", "data.synthetic.num_samples=64",
        "data.synthetic.min_length=100", "data.synthetic.max_length=250",
        "parallel.cp=2", "logging.log_interval=1", "eval.num_samples=2",
    ]


def test_cli_sigterm_saves_then_resumes(base, workdir):
    """`python -m longctx.train` with cp=2 starts 2 local gloo processes; SIGTERM to it stops
    them at a step boundary with a checkpoint (exit 143); the same command resumes and ends
    with the summary, TensorBoard events and a checkpoint."""
    out = workdir / "cli"
    args = [sys.executable, "-m", "longctx.train", "--config", str(CONFIGS / "tiny.yaml"),
            "--set", *_cli_overrides(base, out)]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([*args, "train.steps=100000"], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=env, cwd=ROOT)
    lines = []
    deadline = time.monotonic() + 120
    for line in proc.stdout:
        lines.append(line)
        if line.startswith("step ") and " 2/" in line:
            proc.send_signal(signal.SIGTERM)
            break
        assert time.monotonic() < deadline, "".join(lines)
    rest, _ = proc.communicate(timeout=120)
    text = "".join(lines) + rest
    assert proc.returncode == 143, text
    assert "stopped by SIGTERM at step" in text and "run the same command again" in text, text
    ckpts = sorted((out / "tiny" / "checkpoints").glob("step-*"))
    assert ckpts, text
    stopped_at = int(ckpts[-1].name.split("-")[1])
    assert stopped_at >= 2

    done = subprocess.run([*args, f"train.steps={stopped_at + 2}"], capture_output=True,
                          text=True, env=env, cwd=ROOT, timeout=180, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"resumed from {ckpts[-1]} at step {stopped_at}" in done.stdout, done.stdout
    assert f"finished at step {stopped_at + 2}/{stopped_at + 2} (2 steps this run)" in done.stdout
    assert "held-out answers: exact match" in done.stdout
    run_dir = ckpts[-1].parent.parent
    assert list((run_dir / "tensorboard").glob("events.out.tfevents.*"))
    assert (run_dir / "checkpoints" / f"step-{stopped_at + 2:08d}").is_dir()


def _fail_on_rank_one(config, threads: int, quiet: bool) -> None:
    """A launcher entry point: rank 1 fails at once, rank 0 would wait (in a collective)."""
    if os.environ["RANK"] == "1":
        raise RuntimeError(f"rank 1 breaks ({config})")
    time.sleep(300)


def test_launcher_failing_rank_stops_the_others(capsys, console_logging):
    """torch's elastic launcher (what `longctx train` starts when not under torchrun): a rank
    that fails stops the others at once, the run's code is 1 and the rank's error is shown."""
    from longctx.train.launcher import launch_local

    sigterm = signal.getsignal(signal.SIGTERM)
    start = time.monotonic()
    code = launch_local("cfg-x", 2, quiet=True, entrypoint=_fail_on_rank_one)
    elapsed = time.monotonic() - start
    err = capsys.readouterr().err
    assert code == 1, err
    assert elapsed < 120  # rank 0 was stopped, not left to sleep
    assert "rank 1 breaks (cfg-x)" in err, err
    assert signal.getsignal(signal.SIGTERM) is sigterm  # the launcher's handler is gone


# -- two torchrun agents as two nodes ---------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(shutil.which("torchrun") is None, reason="torchrun is not installed")
def test_two_node_torchrun_rendezvous(base, workdir):
    """`torchrun --nnodes 2` twice on this machine (1 process each, c10d rendezvous): cp=2
    across the two "nodes" trains two steps, rank 0 prints the summary."""
    port = _free_port()
    out = workdir / "two-nodes"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    procs = [
        subprocess.Popen(
            ["torchrun", "--nnodes", "2", "--node-rank", str(node), "--nproc-per-node", "1",
             "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}",
             "--rdzv-id", f"test-{port}", "-m", "longctx.train",
             "--config", str(CONFIGS / "tiny.yaml"), "--set", *_cli_overrides(base, out),
             "train.steps=2", "checkpoint.enabled=false"],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=ROOT,
        )
        for node in (0, 1)
    ]
    outputs = []
    try:
        for p in procs:
            outputs.append(p.communicate(timeout=180)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    text = "\n---\n".join(outputs)
    assert [p.returncode for p in procs] == [0, 0], text
    assert "on 2 processes (cpu, gloo): dp=1 x cp=2 x tp=1" in text, text
    assert "finished at step 2/2" in text, text
    losses = [float(line.split("loss")[1].split("|")[0]) for line in text.splitlines()
              if line.startswith("step ")]
    assert len(losses) == 2 and all(math.isfinite(x) for x in losses)


# -- docstring examples ---------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["config", "loss", "optim", "distributed", "checkpoint",
                                  "metrics", "trainer", "entry", "launcher"])
def test_docstring_examples(name):
    import doctest
    import importlib

    module = importlib.import_module(f"longctx.train.{name}")
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0
