"""`voco export`: the encoder of a run (its newest checkpoint) or of a checkpoint file, in voco's format (the encoder
alone, `voco.checkpoints.formats.export_encoder`) or as nnU-Net pretrained weights (`voco.checkpoints.nnunet`), with
the pretraining's facts and volume fingerprints beside it (``<file>.provenance.json``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

from voco.errors import ConfigError, VocoError

EXPORT_FORMATS = ("voco", "nnunet")


def export_run(source: str, out: str, format: str = "voco", plans: str | None = None,
               configuration: str | None = None, add_configuration: str | None = None,
               say: Callable[[str], None] = print) -> Path:
    """Export the encoder of SOURCE (a checkpoint file, or a run folder: its newest readable checkpoint) to OUT and
    record its provenance; returns OUT. `say` receives what the user should read, a line at a time."""
    from voco.checkpoints import export_encoder, find_latest_checkpoint
    from voco.checkpoints.provenance import run_facts

    if format not in EXPORT_FORMATS:
        raise ConfigError(f"unknown export format {format!r}; use one of {', '.join(EXPORT_FORMATS)}.")
    if format == "voco" and (plans or configuration or add_configuration):
        raise ConfigError("--plans, --configuration and --add_configuration are for --format nnunet; add it, or "
                          "leave them out for voco's encoder file.")
    if format == "nnunet" and not plans:
        raise ConfigError("--format nnunet needs --plans: the nnUNetResEncUNet*Plans.json that "
                          "nnUNetv2_plan_and_preprocess -pl nnUNetPlannerResEncL wrote for your dataset.")
    path = Path(source)
    if path.is_dir():
        latest = find_latest_checkpoint(path)
        if latest is None:
            raise VocoError(f"no checkpoint in {path}; give a checkpoint file or a run folder that has one.")
        path = latest
    if format == "voco":
        written, count = export_encoder(path, out)
        say(f"exported {count} encoder tensors from {path} to {written}")
    else:
        from voco.checkpoints.nnunet import export_nnunet

        found = run_facts(source)
        result = export_nnunet(path, out, plans, configuration or "3d_fullres", add_configuration,
                               facts=found[0] if found else None)
        written = result.path
        say(f"exported {result.encoder_tensors} encoder tensors from {path} into nnU-Net's {result.configuration} "
            f"network of {result.plans} at {written}")
        for sentence in result.differences:
            say(f"preprocessing: {sentence}")
        say(f"fine-tune with: {result.train_command()}")
    record_provenance(source, written, say)
    return written


def record_provenance(source: str, written: Path, say: Callable[[str], None] = print) -> None:
    """The pretraining facts and the fingerprints of the pretraining volumes beside the export, so that
    `voco benchmark check / run` can warn of task images the encoder has seen."""
    from voco.checkpoints.plan import PLAN_KEY, plan_of_facts
    from voco.checkpoints.provenance import run_facts, write_provenance

    found = run_facts(source)
    if found is None:
        say("no pretraining.json in the run folder (a run of an older voco, or a foreign checkpoint): the "
            "export carries no fingerprints of its pretraining volumes, so no leakage check is possible")
        return
    facts, folder = found
    facts = {**facts, PLAN_KEY: plan_of_facts(facts)}  # a run of an older voco recorded no plan: the one it implies
    provenance = write_provenance(written, facts, cache_file=folder / "fingerprints.json")
    content = json.loads(provenance.read_text())
    if content["fingerprints"] is None:  # the export and its plan are done; only the leakage record is missing
        say(f"recorded the pretraining facts and plan in {provenance}, but no fingerprints of the pretraining "
            f"volumes, so no leakage check is possible: {content['no_fingerprints']}")
        return
    say(f"recorded the pretraining facts and {content['volumes']} volume fingerprints in {provenance}"
        + (f" ({content['unreadable']} volumes could not be read)" if content["unreadable"] else ""))
