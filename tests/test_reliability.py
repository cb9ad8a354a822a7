"""Issue #6, engine side: exact resume, atomic and verified checkpoints, graceful preemption, numerical faults.

In-process runs use a tiny cyclic pretext (MAE with its own generator + a contrastive task with an EMA teacher) on
phantom volumes, with the real MONAI/ignite handlers the bundles use. The subprocess tests run the VoCo smoke bundle
as a user does, signal or kill it, and resume it with the same command.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from conftest import (bundle_command, run_module_in_process, run_until_step_line, same_tensors, tracking_store,
                      write_bad_volumes)
from ignite.engine import Events
from monai.data import DataLoader
from monai.handlers import CheckpointLoader, LrScheduleHandler
from monai.optimizers import WarmupCosineSchedule
from monai.utils import set_determinism

from voco.checkpoints import read_checkpoint
from voco.data.manifest import load_manifest, to_datalist
from voco.data.phantoms import ensure_phantoms
from voco.data.regions import build_region_dataset
from voco.engine import (
    EXIT_BAD_DATA,
    EXIT_NON_FINITE,
    AtomicCheckpointSaver,
    GracefulStop,
    PretextTrainer,
    ResumeLoader,
    RunInfo,
    StepLogger,
    latest_checkpoint,
)
from voco.errors import CheckpointError, ConfigError
from voco.networks import build_backbone
from voco.pretext.contrastive import ContrastivePretext
from voco.pretext.cyclic import CyclicPretext
from voco.pretext.mae import MaskedImagePretext

MAX_STEPS = 6  # 5 volumes in batches of 2: epochs of 2 iterations, one volume left out of each


@pytest.fixture(scope="module")
def datalist(tmp_path_factory) -> list[dict]:
    manifest = ensure_phantoms(tmp_path_factory.mktemp("phantoms") / "phantoms", n=5, seed=0)
    return to_datalist(load_manifest(manifest))


class NonFiniteLossAt(torch.nn.Module):
    """A pretext whose training loss is NaN at the given iterations (1-based), to inject numerical faults."""

    def __init__(self, pretext: torch.nn.Module, iterations: set[int]) -> None:
        super().__init__()
        self.pretext, self.iterations, self.calls = pretext, iterations, 0

    def forward(self, batch):
        output = self.pretext(batch)
        if self.training:
            self.calls += 1
            if self.calls in self.iterations:
                output["loss"] = output["loss"] * float("nan")
        return output

    def after_step(self) -> None:
        self.pretext.after_step()


@dataclass
class Run:
    trainer: PretextTrainer
    checkpoints: Path
    losses: dict[int, float]
    weights: dict[int, dict[str, torch.Tensor]]  # iteration -> the pretext's state after it

    @property
    def final_weights(self) -> dict[str, torch.Tensor]:
        return self.weights[max(self.weights)]


def train(datalist: list[dict], checkpoints: Path, *, stop_at: int | None = None, resume: bool = False,
          nan_at: set[int] = frozenset(), max_bad_steps: int = 20, n_saved: int = 2, num_workers: int = 0,
          decoder_dim: int = 32) -> Run:
    """A run as the bundles build it (seeded, then components), with interval checkpoints every step."""
    set_determinism(0)
    backbone = build_backbone("vit", "tiny", input_size=[32, 32, 32], patch_size=8, layout="global")
    pretext = CyclicPretext({
        "mae": MaskedImagePretext(backbone, decoder_dim=decoder_dim, decoder_depth=1, decoder_heads=4, generator=7),
        "contrastive": ContrastivePretext(backbone, num_views=2, embedding_dim=16, teacher_momentum=0.9),
    })
    model = NonFiniteLossAt(pretext, set(nan_at)) if nan_at else pretext
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    schedule = WarmupCosineSchedule(optimizer, warmup_steps=2, t_total=MAX_STEPS)
    dataset = build_region_dataset(datalist, region_size=(32, 32, 32), cache="memory")
    loader = DataLoader(dataset, batch_size=2, shuffle=True, num_workers=num_workers, drop_last=True,
                        generator=torch.Generator().manual_seed(0), persistent_workers=num_workers > 0)
    trainer = PretextTrainer("cpu", model, optimizer, loader, MAX_STEPS, max_bad_steps=max_bad_steps,
                             handlers=[LrScheduleHandler(schedule, epoch_level=False, print_lr=False),
                                       StepLogger(interval=1)])
    objects = {"pretext": pretext, "optimizer": optimizer, "lr_scheduler": schedule, "trainer": trainer,
               "random_state": trainer.random_state,
               "backbone_spec": RunInfo({"name": "vit", "size": "tiny"}, "cyclic", decoder_dim=decoder_dim)}
    saver = AtomicCheckpointSaver(save_dir=str(checkpoints), save_dict=objects, save_interval=1, epoch_level=False,
                                  n_saved=n_saved, save_final=True, final_filename="checkpoint_final.pt")
    saver.attach(trainer)
    if resume:
        ResumeLoader(latest_checkpoint(checkpoints), objects).attach(trainer)
    GracefulStop(saver).attach(trainer)
    run = Run(trainer, checkpoints, {}, {})

    @trainer.on(Events.ITERATION_COMPLETED)
    def record(engine):
        run.losses[engine.state.iteration] = float(engine.state.output[0]["loss"])
        run.weights[engine.state.iteration] = {k: v.clone() for k, v in pretext.state_dict().items()}

    if stop_at is not None:  # a SIGTERM that arrives during step `stop_at`
        trainer.add_event_handler(Events.ITERATION_STARTED(once=stop_at), lambda _: os.kill(os.getpid(),
                                                                                            signal.SIGTERM))
    trainer.run()
    return run


def test_a_failed_resume_leaves_the_trained_checkpoints_as_they_were(uninterrupted, datalist, tmp_path):
    """Resuming with another model setting fails in load_state_dict; MONAI's save-on-exception would then write the
    untrained state as checkpoint_final.pt over the trained one. Nothing is written when nothing was trained, and
    the error is one sentence naming the setting and the tensors that differ."""
    folder = tmp_path / "checkpoints"
    shutil.copytree(uninterrupted.checkpoints, folder)
    before = {path.name: path.read_bytes() for path in folder.iterdir()}
    with pytest.raises(CheckpointError) as failed:
        train(datalist, folder, resume=True, decoder_dim=48)
    message = str(failed.value)
    assert message.startswith(f"checkpoint {latest_checkpoint(folder)} was written by a run with other model "
                              "settings (decoder_dim 32 there, 48 here; ")
    assert "(32,) there, (48,) here" in message and "more tensors" in message
    assert message.endswith("resume it with its original settings, or start a new run with another --run_name.")
    assert "\n" not in message
    assert {path.name: path.read_bytes() for path in folder.iterdir()} == before


def test_resume_passes_over_files_no_checkpoint_saver_wrote(uninterrupted, datalist, tmp_path, capsys):
    """An exported encoder named like an interval checkpoint of a later step ranks first by its name; it holds no
    trainer state, so resume takes the run's own newest checkpoint and says what it passed over."""
    folder = tmp_path / "checkpoints"
    shutil.copytree(uninterrupted.checkpoints, folder)
    own_newest = latest_checkpoint(folder)
    torch.save(read_checkpoint(own_newest)["pretext"], folder / "encoder_export_50000.pt")
    capsys.readouterr()
    assert latest_checkpoint(folder) == own_newest
    assert (f"resume passes over encoder_export_50000.pt in {folder}: no trainer state in it"
            in capsys.readouterr().out)


@pytest.fixture(scope="module")
def uninterrupted(datalist, tmp_path_factory) -> Run:
    return train(datalist, tmp_path_factory.mktemp("uninterrupted"))


# ------------------------------------------------------------------------------------ exact resume


@pytest.mark.parametrize("stop_at", [3, 4])  # inside the second epoch, and at its end
def test_a_run_stopped_at_step_k_resumes_to_the_uninterrupted_weights(datalist, uninterrupted, tmp_path, stop_at,
                                                                      capsys):
    stopped = train(datalist, tmp_path, stop_at=stop_at)
    assert stopped.trainer.state.iteration == stop_at and stopped.trainer.state.exit_code == 143
    assert f"stopped after step {stop_at} (SIGTERM)" in capsys.readouterr().out
    leftovers = [tmp_path / "tmpk1ll3d_9", tmp_path / ".checkpoint_iteration=5.pt.4242.0badc0de.tmp"]
    for leftover in leftovers:  # what a kill during a checkpoint write leaves (ignite's name, and ours)
        leftover.write_bytes(b"half a checkpoint")
    resumed = train(datalist, tmp_path, resume=True)

    assert not any(leftover.exists() for leftover in leftovers)
    assert {**stopped.losses, **resumed.losses} == uninterrupted.losses  # the same loss at every step, bitwise
    assert same_tensors(resumed.final_weights, uninterrupted.final_weights)
    # the optimizer moment estimates and EMA teacher came back too: the state after every resumed step matches
    assert all(same_tensors(resumed.weights[step], uninterrupted.weights[step]) for step in resumed.weights)
    # the stopped run's interval checkpoints joined the rotation: only the newest n_saved (2) are left
    names = sorted(path.name for path in tmp_path.glob("checkpoint_iteration=*.pt"))
    assert names == [f"checkpoint_iteration={MAX_STEPS - 1}.pt", f"checkpoint_iteration={MAX_STEPS}.pt"]
    # each file has its checksum beside it, and the rotation took the checksums of the files it removed with them
    assert sorted(path.name for path in tmp_path.glob("*.sha256")) == sorted(
        f"{path.name}.sha256" for path in tmp_path.glob("*.pt"))


def test_with_worker_processes_a_resumed_run_still_matches_the_uninterrupted_one(datalist, uninterrupted, tmp_path):
    """Each item's random region is seeded from (seed, epoch, index), so neither the worker that makes it nor a
    resume changes it: two workers, stopped and resumed, give the weights of the run without workers."""
    stopped = train(datalist, tmp_path, stop_at=3, num_workers=2)
    resumed = train(datalist, tmp_path, resume=True, num_workers=2)
    assert {**stopped.losses, **resumed.losses} == uninterrupted.losses
    assert same_tensors(resumed.final_weights, uninterrupted.final_weights)


def test_checkpoints_hold_every_random_state_as_plain_weights(uninterrupted):
    """The random state loads with weights_only=True, like the rest of the checkpoint."""
    state = read_checkpoint(latest_checkpoint(uninterrupted.checkpoints))
    ranks = state["random_state"]["ranks"]
    assert len(ranks) == 1
    assert set(ranks[0]) == {"python", "numpy", "torch", "cuda", "pretext", "transforms", "data_loader",
                             "batches_into_epoch"}
    assert list(ranks[0]["pretext"]) == ["tasks.mae"]  # the MAE task's own generator
    assert len(ranks[0]["transforms"]) >= 1 and ranks[0]["data_loader"] is not None
    assert state["trainer"]["iteration"] == MAX_STEPS and state["trainer"]["skipped_steps"] == 0


class IndexPretext(torch.nn.Module):
    """A one-weight pretext over batches ``{"image": volume indices}``: it records which volumes each step saw."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(1))
        self.seen: list[list[int]] = []

    def forward(self, batch):
        if self.training:
            self.seen.append(batch["image"].flatten().tolist())
        return {"loss": (self.weight * batch["image"].float()).mean()}


def test_a_distributed_sampler_gets_its_epoch_and_resumes_inside_an_epoch(tmp_path):
    """Under torchrun the loader's DistributedSampler shuffles by epoch (MONAI's trainer calls set_epoch); a run
    resumed inside an epoch goes on with the rest of that epoch's shard."""
    from monai.data import DistributedSampler

    def run(checkpoints, stop_at=None, resume=False):
        volumes = [{"image": torch.tensor([index])} for index in range(8)]
        sampler = DistributedSampler(volumes, num_replicas=2, rank=1, shuffle=True, seed=0)
        loader = DataLoader(volumes, batch_size=2, sampler=sampler, num_workers=0, drop_last=True)
        pretext = IndexPretext()
        optimizer = torch.optim.SGD(pretext.parameters(), lr=0.1)
        trainer = PretextTrainer("cpu", pretext, optimizer, loader, 6)
        objects = {"pretext": pretext, "optimizer": optimizer, "trainer": trainer,
                   "random_state": trainer.random_state}
        saver = AtomicCheckpointSaver(save_dir=str(checkpoints), save_dict=objects, save_interval=1,
                                      epoch_level=False)
        saver.attach(trainer)
        if resume:
            CheckpointLoader(latest_checkpoint(checkpoints), objects).attach(trainer)
        GracefulStop(saver).attach(trainer)
        if stop_at is not None:
            trainer.add_event_handler(Events.ITERATION_STARTED(once=stop_at),
                                      lambda _: os.kill(os.getpid(), signal.SIGTERM))
        trainer.run()
        return pretext.seen, sampler.epoch

    seen, last_epoch = run(tmp_path / "uninterrupted")
    assert last_epoch == 3 and len(seen) == 6  # 3 epochs of 2 iterations over this rank's half of the 8 volumes
    epochs = [sum(seen[i:i + 2], []) for i in (0, 2, 4)]
    assert all(len(set(epoch)) == 4 for epoch in epochs) and epochs[0] != epochs[1] != epochs[2]  # shuffled anew
    before, _ = run(tmp_path / "stopped", stop_at=3)
    after, _ = run(tmp_path / "stopped", resume=True)
    assert before + after == seen


# ------------------------------------------------------------------------------- checkpoint files


def test_a_damaged_newest_checkpoint_is_passed_over_with_a_message(datalist, uninterrupted, tmp_path, capsys):
    stopped = train(datalist, tmp_path, stop_at=4, n_saved=3)
    assert stopped.trainer.state.iteration == 4
    newest, previous = tmp_path / "checkpoint_iteration=4.pt", tmp_path / "checkpoint_iteration=3.pt"
    content = newest.read_bytes()
    newest.write_bytes(content[: len(content) // 2])  # truncated, as by a full disk or a copy cut short
    capsys.readouterr()

    assert latest_checkpoint(tmp_path) == str(previous)
    message = capsys.readouterr().out
    assert f"checkpoint {newest} cannot be read" in message and f"taking the previous one, {previous}" in message
    resumed = train(datalist, tmp_path, resume=True, n_saved=3)
    assert min(resumed.losses) == 4 and same_tensors(resumed.final_weights, uninterrupted.final_weights)


def test_a_flipped_bit_in_the_newest_checkpoint_is_caught_by_its_checksum(datalist, uninterrupted, tmp_path, capsys):
    """Issue 16 item 6: one bit flipped inside a tensor record still loads with torch (zip CRCs are not checked);
    the SHA-256 recorded at writing catches it, and resume takes the previous checkpoint."""
    stopped = train(datalist, tmp_path, stop_at=4, n_saved=3)
    newest, previous = tmp_path / "checkpoint_iteration=4.pt", tmp_path / "checkpoint_iteration=3.pt"
    tensor = next(value for value in stopped.final_weights.values() if value.numel() > 64)
    content = bytearray(newest.read_bytes())
    start = content.find(tensor.numpy().tobytes())
    assert start > 0
    content[start + tensor.numel() * tensor.element_size() // 2] ^= 0x10
    newest.write_bytes(bytes(content))
    assert torch.load(newest, weights_only=True)["trainer"]["iteration"] == 4  # torch alone does not notice
    capsys.readouterr()

    with pytest.raises(CheckpointError, match=r"does not match the SHA-256 recorded when it was written "
                                              r"\(checkpoint_iteration=4.pt.sha256\): it was damaged since"):
        read_checkpoint(newest)
    assert latest_checkpoint(tmp_path) == str(previous)
    assert f"checkpoint {newest} cannot be read" in capsys.readouterr().out
    resumed = train(datalist, tmp_path, resume=True, n_saved=3)
    assert min(resumed.losses) == 4 and same_tensors(resumed.final_weights, uninterrupted.final_weights)


def test_a_zero_byte_newest_checkpoint_is_passed_over(tmp_path, capsys):
    """An empty file (a node crash between create and write) fails torch.load with an EOFError without a message."""
    torch.save({"trainer": {"iteration": 1}}, tmp_path / "checkpoint_iteration=1.pt")
    (tmp_path / "checkpoint_iteration=2.pt").write_bytes(b"")
    assert latest_checkpoint(tmp_path) == str(tmp_path / "checkpoint_iteration=1.pt")
    assert "checkpoint_iteration=2.pt cannot be read" in capsys.readouterr().out


def test_a_checkpoint_that_looks_complete_but_does_not_read_is_passed_over(tmp_path, capsys):
    torch.save({"trainer": {"iteration": 1}}, tmp_path / "checkpoint_iteration=1.pt")
    with zipfile.ZipFile(tmp_path / "checkpoint_iteration=2.pt", "w") as archive:  # a zip with its directory
        archive.writestr("archive/data.pkl", b"not a pickle")
    assert latest_checkpoint(tmp_path) == str(tmp_path / "checkpoint_iteration=1.pt")
    assert "checkpoint_iteration=2.pt cannot be read" in capsys.readouterr().out

    (tmp_path / "checkpoint_iteration=1.pt").write_bytes(b"")
    with pytest.raises(CheckpointError, match="none of the 2 checkpoints .* can be read.*--resume False"):
        latest_checkpoint(tmp_path)
    assert latest_checkpoint(tmp_path / "absent") is None


def test_checkpoints_are_written_atomically(tmp_path, monkeypatch):
    """A write that fails half-way (a kill, a full disk) leaves neither a truncated file nor a temporary one."""
    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    trainer = PretextTrainer("cpu", model, optimizer, [{"image": None}], 1)
    saver = AtomicCheckpointSaver(save_dir=str(tmp_path), save_dict={"model": model, "optimizer": optimizer},
                                  save_interval=1, epoch_level=False)
    trainer.state.iteration = 1
    assert saver.save_now(trainer) == tmp_path / "checkpoint_iteration=1.pt"
    real_save = torch.save

    def interrupted_save(obj, file, **kwargs):
        real_save(obj, file, **kwargs)
        with open(file, "r+b") as stream:  # the saver writes a temporary file (a path) and renames it when done
            stream.truncate(10)
        raise OSError("No space left on device")

    monkeypatch.setattr(torch, "save", interrupted_save)
    trainer.state.iteration = 2
    with pytest.raises(OSError, match="No space left"):
        saver.save_now(trainer)
    # the first checkpoint and its checksum, nothing of the failed write
    assert sorted(os.listdir(tmp_path)) == ["checkpoint_iteration=1.pt", "checkpoint_iteration=1.pt.sha256"]
    assert read_checkpoint(tmp_path / "checkpoint_iteration=1.pt")["model"]["weight"].shape == (2, 2)


# ---------------------------------------------------------------------------------- numerical faults


def test_non_finite_steps_are_skipped_and_counted(datalist, tmp_path, capsys):
    run = train(datalist, tmp_path, nan_at={2, 3})
    state = run.trainer.state
    assert state.iteration == MAX_STEPS and state.exit_code is None
    assert state.skipped_steps == 2 and state.bad_steps_in_a_row == 0
    assert same_tensors(run.weights[3], run.weights[1])  # skipped: no optimizer step, no teacher update
    assert not same_tensors(run.weights[4], run.weights[3])
    assert all(torch.isfinite(value).all() for value in run.final_weights.values() if value.is_floating_point())
    out = capsys.readouterr().out
    assert "step 2: the loss (nan) or the gradient norm (nan) is not finite; the optimizer step is skipped" in out
    assert f"step {MAX_STEPS}/{MAX_STEPS}" in out and "numerics/skipped_steps 2" in out
    assert read_checkpoint(tmp_path / "checkpoint_final.pt")["trainer"]["skipped_steps"] == 2


def test_a_non_finite_gradient_with_a_finite_loss_is_skipped(datalist, tmp_path):
    set_determinism(0)
    model = torch.nn.Conv3d(1, 1, 3)

    class Pretext(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, batch):
            return {"loss": self.model(batch["image"]).mean()}

    model.weight.register_hook(lambda gradient: gradient * float("inf"))
    dataset = build_region_dataset(datalist, region_size=(8, 8, 8), cache="memory")
    loader = DataLoader(dataset, batch_size=2, num_workers=0, drop_last=True)
    before = model.weight.detach().clone()
    trainer = PretextTrainer("cpu", Pretext(), torch.optim.SGD(model.parameters(), lr=0.1), loader, 2)
    trainer.run()
    assert trainer.state.skipped_steps == 2 and torch.equal(model.weight, before)


def test_repeated_non_finite_steps_stop_the_run_with_the_last_good_weights(datalist, tmp_path, capsys):
    run = train(datalist, tmp_path, nan_at={3, 4, 5, 6}, max_bad_steps=2)
    state = run.trainer.state
    assert state.iteration == 4 and state.stop_reason == "non-finite" and state.exit_code == EXIT_NON_FINITE
    out = capsys.readouterr().out
    assert ("stopping at step 4: 2 optimizer steps in a row had a non-finite loss or gradient norm, so the weights "
            "are those of the last good step; resume with a lower learning_rate, precision fp32 or a gradient_clip"
            in out)
    checkpoint = read_checkpoint(latest_checkpoint(tmp_path))
    assert checkpoint["trainer"]["iteration"] == 4 and checkpoint["trainer"]["skipped_steps"] == 2
    assert same_tensors(checkpoint["pretext"], run.weights[2])
    assert not (tmp_path / "checkpoint_final.pt").exists()  # stopped, not completed


SLOW_RUN = """
import time, torch
from ignite.engine import Events
from voco.engine import GracefulStop, PretextTrainer

class SlowPretext(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(1))

    def forward(self, batch):
        time.sleep(2)
        return {"loss": (self.weight * batch["image"]).sum()}

pretext = SlowPretext()
trainer = PretextTrainer("cpu", pretext, torch.optim.SGD(pretext.parameters(), lr=0.1), [{"image": torch.ones(1)}], 9)
GracefulStop().attach(trainer)
trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda engine: print("step", engine.state.iteration, flush=True))
trainer.run()
"""


def test_a_second_signal_stops_at_once_and_a_repeated_one_does_not():
    import sys

    process = subprocess.Popen([sys.executable, "-c", SLOW_RUN], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True)
    assert process.stdout.readline() == "step 1\n"
    for signum in (signal.SIGTERM, signal.SIGTERM, signal.SIGINT):  # the repeat comes within repeat_window_s
        process.send_signal(signum)
        time.sleep(0.3)  # one at a time: pending signals are delivered lowest number first
    out, err = process.communicate(timeout=60)
    assert process.returncode == -signal.SIGINT, out + err
    assert err.count("received SIGTERM: stopping after this step with a checkpoint") == 1
    assert "received SIGINT while stopping: stopping at once, without a checkpoint." in err
    assert out == ""  # step 2 never finished


# --------------------------------------------------------------------------- the bundle, interrupted

SMOKE = ("voco_pretrain", ["train.json", "smoke.json"])
BUNDLE_STEPS = 8


def start_smoke_run(cwd: Path, run_name: str) -> subprocess.Popen:
    command = bundle_command(*SMOKE, "--max_steps", str(BUNDLE_STEPS), "--checkpoint_interval", "1",
                             "--log_interval", "1", "--tracking", "mlflow", "--tracking_uri",
                             tracking_store(cwd), "--run_name", run_name, "--probe", "False")  # not under test here
    return subprocess.Popen(command, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def mlflow_run(cwd: Path, run_name: str):
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{cwd}/runs/mlflow.db")
    experiment = client.get_experiment_by_name("voco_pretrain")
    runs = [run for run in client.search_runs([experiment.experiment_id]) if run.info.run_name == run_name]
    assert len(runs) == 1, [run.info.status for run in runs]
    return client, runs[0]


@pytest.fixture(scope="module")
def interrupted_bundle(tmp_path_factory):
    """One uninterrupted smoke run, and one that is killed (SIGKILL) at a random step, resumed and stopped by SIGTERM,
    then resumed to the end — each time with the same command."""
    cwd = tmp_path_factory.mktemp("interrupted")
    code, reference_out = run_until_step_line(start_smoke_run(cwd, "reference"), 0, None)
    assert code == 0, reference_out[-3000:]
    kill_at = random.Random().randint(2, 4)
    killed_code, killed_out = run_until_step_line(start_smoke_run(cwd, "chain"), kill_at, lambda p: p.kill())
    stopped_code, stopped_out = run_until_step_line(start_smoke_run(cwd, "chain"), 0,
                                                    lambda p: p.send_signal(signal.SIGTERM))
    _, stopped_run = mlflow_run(cwd, "chain")
    newest = latest_checkpoint(cwd / "runs" / "chain" / "checkpoints")
    stopped_checkpoint = (newest, read_checkpoint(newest)["trainer"]["iteration"])
    final_code, final_out = run_until_step_line(start_smoke_run(cwd, "chain"), 0, None)
    return {"cwd": cwd, "kill_at": kill_at, "killed": (killed_code, killed_out), "stopped": (stopped_code, stopped_out),
            "stopped_status": stopped_run.info.status, "stopped_checkpoint": stopped_checkpoint,
            "final": (final_code, final_out)}


def test_sigterm_stops_the_bundle_with_a_checkpoint_and_a_killed_mlflow_run(interrupted_bundle):
    runs = interrupted_bundle
    assert runs["killed"][0] == -signal.SIGKILL
    code, out = runs["stopped"]
    assert code == 143, out[-3000:]
    assert "received SIGTERM: stopping after this step with a checkpoint" in out
    stopped_line = next(line for line in out.splitlines() if line.startswith("stopped after step"))
    step = int(stopped_line.split()[3])
    assert step < BUNDLE_STEPS and "(SIGTERM)" in stopped_line and "exit code 143" in stopped_line
    checkpoint = runs["cwd"] / "runs" / "chain" / "checkpoints" / f"checkpoint_iteration={step}.pt"
    assert str(checkpoint) in stopped_line and runs["stopped_checkpoint"] == (str(checkpoint), step)
    assert runs["stopped_status"] == "KILLED"
    # the COMPLETED handlers did not run: no final validation, no picture
    assert "validation at step" not in out.split(stopped_line)[1] and "views of one region" not in out


def test_killed_and_stopped_bundle_resumes_to_the_uninterrupted_weights(interrupted_bundle):
    runs, cwd = interrupted_bundle, interrupted_bundle["cwd"]
    code, out = runs["final"]
    assert code == 0, out[-3000:]
    assert f"step {BUNDLE_STEPS}/{BUNDLE_STEPS}" in out
    reference = read_checkpoint(cwd / "runs" / "reference" / "checkpoints" / "checkpoint_final.pt")
    resumed = read_checkpoint(cwd / "runs" / "chain" / "checkpoints" / "checkpoint_final.pt")
    assert resumed["trainer"]["iteration"] == BUNDLE_STEPS
    assert same_tensors(resumed["pretext"], reference["pretext"]), f"killed at step {runs['kill_at']}"
    # one MLflow run went on through the kill and the stop; every logged loss equals the uninterrupted run's
    client, chain = mlflow_run(cwd, "chain")
    assert chain.info.status == "FINISHED"
    _, uninterrupted = mlflow_run(cwd, "reference")
    expected = {point.step: point.value for point in client.get_metric_history(uninterrupted.info.run_id, "loss")}
    history = client.get_metric_history(chain.info.run_id, "loss")
    assert sorted({point.step for point in history}) == list(range(1, BUNDLE_STEPS + 1))
    assert all(point.value == expected[point.step] for point in history), f"killed at step {runs['kill_at']}"


# --------------------------------------------------------------------------- the bundle fed bad volumes


def mixed_manifest(folder: Path, extra_missing: int = 0) -> tuple[Path, list[str]]:
    """Phantoms (3 for training, 2 for validation) with the five kinds of bad volume (and `extra_missing` more
    missing files) added as training subjects -> (manifest path, bad paths)."""
    import json

    manifest = load_manifest(ensure_phantoms(folder / "phantoms", n=5, seed=0))
    manifest["dataset_dir"] = "phantoms"
    dataset = manifest["datasets"][0]
    for index, subject in enumerate(dataset["subjects"]):
        for study in subject["studies"]:
            for scan in study["scans"]:
                scan["split"] = "validation" if index >= 3 else "training"
    bad = write_bad_volumes(folder / "bad") + [str(folder / "bad" / f"gone{i}.nii.gz") for i in range(extra_missing)]
    dataset["subjects"] += [{"id": f"bad{i}", "studies": [{"id": "0", "scans": [{"image": path, "split": "training"}]}]}
                            for i, path in enumerate(bad)]
    path = folder / "mixed.json"
    path.write_text(json.dumps({key: value for key, value in manifest.items() if not key.startswith("_")}))
    return path, bad


def run_smoke_bundle(cwd: Path, run_name: str, *overrides: str) -> subprocess.CompletedProcess:
    command = bundle_command(*SMOKE, "--tracking", "mlflow", "--tracking_uri", tracking_store(cwd),
                             "--run_name", run_name, *overrides)
    return run_module_in_process(command, cwd)


def test_bad_volumes_in_a_bundle_run_are_skipped_counted_and_named(tmp_path):
    manifest, bad = mixed_manifest(tmp_path)
    # 3 good + 5 bad training volumes in batches of 2: the 4 smoke steps visit every one of them once
    result = run_smoke_bundle(tmp_path, "mixed", "--manifest", str(manifest), "--max_steps", "4")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    client, run = mlflow_run(tmp_path, "mixed")
    assert run.info.status == "FINISHED"
    assert run.data.metrics["data/skipped_volumes"] == len(bad)
    skip_lines = [line for line in (result.stdout + result.stderr).splitlines() if "skipping a bad volume: " in line]
    assert len(skip_lines) == len(bad) and all(any(path in line for line in skip_lines) for path in bad)


def test_the_strict_policy_stops_a_bundle_run_cleanly_at_a_bad_volume(tmp_path):
    manifest, bad = mixed_manifest(tmp_path)
    # one worker process: the error comes from inside a DataLoader worker, and still ends in one sentence
    result = run_smoke_bundle(tmp_path, "strict", "--manifest", str(manifest), "--bad_volumes", "stop",
                              "--num_workers", "1", "--max_steps", "4")
    assert result.returncode == EXIT_BAD_DATA, result.stdout[-3000:] + result.stderr[-3000:]
    stop_line = next(line for line in result.stdout.splitlines() if line.startswith("stopping: "))
    assert any(path in stop_line for path in bad)
    assert "Traceback" not in result.stdout + result.stderr
    _, run = mlflow_run(tmp_path, "strict")
    assert run.info.status == "FAILED"


def test_a_mostly_bad_manifest_fails_before_training_with_one_sentence(tmp_path):
    manifest, bad = mixed_manifest(tmp_path, extra_missing=3)  # headers: missing x4, 2-D, empty bad; 6 of 11 training
    result = run_smoke_bundle(tmp_path, "mostly-bad", "--manifest", str(manifest))
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1].startswith(
        "error: 6 of the 11 volumes checked before training cannot be used (the first: ")
    assert "Traceback" not in result.stderr and "step 1/" not in result.stdout


def test_a_mistyped_override_stops_the_bundle_before_anything_is_written(tmp_path):
    """Issue 16 item 10: MONAI's parser would add ``max_step`` as a new, unused entry and train with the default.
    The run stops before it writes anything of its own; only the executed-config record that MONAI's ``--tracking``
    writes while it builds the workflow (before any bundle code runs) is there."""
    result = run_smoke_bundle(tmp_path, "typo", "--max_step", "1")
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == (
        "error: --max_step names no setting of bundles/voco_pretrain (train.json, smoke.json), so it would be "
        "ignored; did you mean --max_steps?")
    assert all(path.name.startswith("config_") for path in (tmp_path / "runs" / "typo").iterdir())
    assert "Traceback" not in result.stderr and "step 1/" not in result.stdout


def test_run_bundle_checks_its_overrides_too():
    from voco.bundles import run_bundle

    with pytest.raises(ConfigError, match=r"^--learning_rat names no setting of bundles/voco_pretrain \(train.json, "
                                          r"smoke.json\), so it would be ignored; did you mean --learning_rate\?$"):
        run_bundle("voco_pretrain", ["train.json", "smoke.json"], learning_rat=1.0)


def test_a_crash_in_validation_ends_the_mlflow_run_failed(tmp_path, monkeypatch):
    """Issue 16 item 4: an exception other than a clean stop (here the disk failing while validation runs) ends the
    MLflow run FAILED rather than leaving it RUNNING, keeps the exception, and restores the signal handlers."""
    import mlflow

    from voco.bundles import run_bundle
    from voco.engine import PretextValidation

    def disk_full(self, engine):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(PretextValidation, "__call__", disk_full)
    monkeypatch.chdir(tmp_path)
    handlers = {signum: signal.getsignal(signum) for signum in (signal.SIGTERM, signal.SIGINT)}
    tracking_uri = tracking_store(tmp_path)
    with pytest.raises(RuntimeError) as raised:  # MONAI's config expression wraps what the run raised
        run_bundle("voco_pretrain", ["train.json", "smoke.json"], tracking="mlflow", tracking_uri=tracking_uri,
                   run_name="crash", max_steps=4, val_interval=2, probe=False)
    assert isinstance(raised.value.__cause__, OSError) and "No space left" in str(raised.value.__cause__)
    client = mlflow.MlflowClient(tracking_uri=tracking_uri)
    runs = client.search_runs([client.get_experiment_by_name("voco_pretrain").experiment_id])
    assert [(run.info.run_name, run.info.status) for run in runs] == [("crash", "FAILED")]
    assert {signum: signal.getsignal(signum) for signum in handlers} == handlers


@pytest.mark.parametrize("name, value, need", [
    ("batch_size", 0, "a whole number of at least 1 (the default is 2)"),
    ("num_workers", -1, "a whole number of at least 0 (the default is 0)"),
    ("max_steps", 2.5, "a whole number of at least 1 (the default is 4)"),
    ("learning_rate", "nan", "a positive finite number (the default is 0.001)"),
    ("learning_rate", -0.1, "a positive finite number (the default is 0.001)"),
    ("region_size", "abc", "a list of 3 positive whole numbers, e.g. [96, 96, 96]"),
    ("region_size", [64, 64], "a list of 3 positive whole numbers, e.g. [96, 96, 96]"),
    ("probe", "false", "True or False (capitalised) (the default is True)"),
])
def test_a_bad_value_stops_the_bundle_before_anything_runs(tmp_path, monkeypatch, name, value, need):
    """Issue 16 items 11 and 13: each of these ended in a traceback deep in a transform or the optimizer, or did
    something else (``--max_steps 2.5`` ran 3 steps; ``--probe false`` is the text 'false', which counts as true)."""
    import sys

    from voco.bundles import bundle_dir, check_command_line, run_bundle

    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError) as raised:
        run_bundle("voco_pretrain", ["train.json", "smoke.json"], **{name: value})
    assert str(raised.value) == f"--{name} {value!r} cannot be used; give {need}."
    assert not (tmp_path / "runs").exists()
    # the same from the command line, values parsed as python-fire parses them
    configs = [str(bundle_dir("voco_pretrain") / "configs" / file) for file in ("train.json", "smoke.json")]
    typed = str(value).replace(" ", "")
    monkeypatch.setattr(sys, "argv", ["/venv/monai/bundle/__main__.py", "run", "--config_file", repr(configs),
                                      f"--{name}", typed, "--run_name", "r"])
    with pytest.raises(ConfigError, match=rf"^--{name} .* cannot be used; give "):
        check_command_line()
