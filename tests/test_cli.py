"""The `voco` command as a new user runs it: help, manifest build/check/stats, synth, regions, clear errors."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from voco.cli import main


def voco(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_console_script_help():
    script = Path(sys.executable).parent / "voco"
    if not script.exists():
        pytest.skip("the voco console script is not installed in this environment (run `make venv`)")
    result = subprocess.run([str(script), "--help"], capture_output=True, text=True, timeout=120,
                            env={"PAGER": "cat", "PATH": "/usr/bin:/bin"})
    assert result.returncode == 0
    shown = result.stdout + result.stderr  # fire writes help to stderr when it is not a terminal
    for command in ("manifest", "synth", "demo", "export", "nnunet_raw", "regions"):
        assert command in shown


def test_manifest_build_check_stats_on_the_real_volumes(shared_data, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, out, _ = voco(capsys, "manifest", "build", str(shared_data))
    assert code == 0 and "3 scans, 0 skipped" in out
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["format"] == "voco-manifest"
    code, out, _ = voco(capsys, "manifest", "check", "manifest.json")
    assert code == 0 and "no problems" in out
    code, out, _ = voco(capsys, "manifest", "stats", "manifest.json")
    assert code == 0 and "3" in out


def test_manifest_check_reports_a_bad_volume_with_exit_code_1(shared_data, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    data = tmp_path / "data"
    data.mkdir()
    shutil.copy(shared_data / "mr_abdomen_3mm.nii.gz", data / "good.nii.gz")
    bad = np.zeros((8, 8, 8), np.float32)
    bad[1, 1, 1] = np.nan
    nib.save(nib.Nifti1Image(bad, np.eye(4)), str(data / "nan.nii.gz"))
    code, out, _ = voco(capsys, "manifest", "build", str(data), "--modality", "MR")
    assert code == 0 and "2 scans" in out  # the header of the NaN volume is fine: build reads headers only
    with pytest.raises(SystemExit) as exit_info:
        voco(capsys, "manifest", "check", "manifest.json")
    assert exit_info.value.code == 1
    assert "nan.nii.gz" in capsys.readouterr().out


def test_synth_and_regions(tmp_path, capsys):
    code, out, _ = voco(capsys, "synth", str(tmp_path / "phantoms"), "--n", "2", "--seed", "3")
    assert code == 0 and "wrote 2 phantoms" in out
    code, out, _ = voco(capsys, "regions", str(tmp_path / "phantoms" / "manifest.json"), "--region_size",
                        "[64,64,32]", "--batches", "1")
    assert code == 0 and "(2, 1, 64, 64, 32)" in out


def test_user_errors_are_one_sentence_with_exit_code_2(tmp_path, capsys):
    code, _, err = voco(capsys, "manifest", "build", str(tmp_path / "nowhere"))
    assert code == 2
    assert err.startswith("voco: error: ") and "nowhere" in err and err.count("\n") == 1
    (tmp_path / "broken.json").write_text("{not json")
    code, _, err = voco(capsys, "manifest", "stats", str(tmp_path / "broken.json"))
    assert code == 2 and "broken.json" in err and "not valid JSON" in err


def test_bad_values_and_places_are_one_sentence_not_a_traceback(tmp_path, capsys):
    """Issue 16 item 11: each of these ended in a traceback."""
    from voco.data.phantoms import ensure_phantoms

    manifest = ensure_phantoms(tmp_path / "scans", n=2, seed=0)
    folder = tmp_path / "a_folder"
    folder.mkdir()
    code, _, err = voco(capsys, "manifest", "build", str(tmp_path / "scans"), "--output", str(folder))
    assert code == 2 and err == f"voco: error: {folder} is a folder; give the path of the file to write (one " \
                                "inside it, for example).\n"
    assert list(folder.iterdir()) == []
    torch = pytest.importorskip("torch")
    torch.save({"swinViT.patch_embed.proj.weight": torch.zeros(2, 1, 2, 2, 2)}, tmp_path / "encoder_source.pt")
    code, _, err = voco(capsys, "export", str(tmp_path / "encoder_source.pt"), "--out", str(folder))
    assert code == 2 and f"{folder} is a folder" in err and err.count("\n") == 1
    for option, value, sentence in (
            ("--region_size", "abc", "region_size ('a', 'b', 'c') must be three positive voxel counts"),
            ("--region_size", "[64,64]", "region_size (64, 64) must be three positive voxel counts"),
            ("--batch_size", "0", "batch_size 0 must be a whole number of at least 1."),
            ("--num_workers", "-1", "num_workers -1 must be a whole number of at least 0.")):
        code, _, err = voco(capsys, "regions", str(manifest), option, value)
        assert code == 2 and err.startswith(f"voco: error: {sentence}") and err.count("\n") == 1, err
    deep = tmp_path / "deep.json"
    deep.write_text("[" * 200_000 + "]" * 200_000)
    code, _, err = voco(capsys, "manifest", "stats", str(deep))
    assert code == 2 and err == f"voco: error: manifest {deep} is nested too deeply to be a manifest; fix the " \
                                "file or rebuild it with `voco manifest build`.\n"
    written = json.loads(manifest.read_text())
    written["datasets"][0]["subjects"][0]["studies"][0]["scans"][0]["shape"] = ["a", "b", "c"]
    (tmp_path / "scans" / "lettered.json").write_text(json.dumps(written))
    code, _, err = voco(capsys, "manifest", "check", str(tmp_path / "scans" / "lettered.json"))
    assert code == 2 and "shape is ['a', 'b', 'c'], not a list of three positive numbers; fix or remove it." in err


def test_a_mistyped_option_is_refused_before_anything_is_done(tmp_path, capsys, monkeypatch):
    """Issue 16 item 10: fire would build the manifest into ./manifest.json with the options it knows, then
    complain about --ouptut; the command is refused first, naming the option meant."""
    from voco.data.phantoms import ensure_phantoms

    ensure_phantoms(tmp_path / "scans", n=1, seed=0)
    monkeypatch.chdir(tmp_path)
    before = sorted(path.name for path in tmp_path.iterdir())
    code, out, err = voco(capsys, "manifest", "build", str(tmp_path / "scans"), "--ouptut", "x.json")
    assert code == 2 and out == ""
    assert err == "voco: error: voco manifest build has no option --ouptut, so nothing was done; did you mean " \
                  "--output?\n"
    assert sorted(path.name for path in tmp_path.iterdir()) == before  # neither manifest.json nor x.json
    code, _, err = voco(capsys, "regions", "m.json", "--region-sise=[8,8,8]")
    assert code == 2 and "voco regions has no option --region_sise, so nothing was done; did you mean " \
                         "--region_size?" in err
    # fire's spellings of real options still pass: hyphens, --flag=value, --noflag for a boolean
    from voco.cli import VocoCommands, check_options

    check_options(VocoCommands(), ["manifest", "build", "d", "--output=x.json", "--novoxels", "--dataset", "a"])
    check_options(VocoCommands(), ["regions", "m.json", "--region-size", "[8,8,8]", "--", "--help"])


def test_the_demo_verdict_reports_both_differences_and_the_benchmark_measurement(tmp_path):
    from voco.cli import demo_verdict

    rows = [{"frozen probe Dice": "0.250", "fine-tuned large-organ Dice": "0.300"},
            {"frozen probe Dice": "0.290", "fine-tuned large-organ Dice": "0.280"}]
    absent = demo_verdict(rows, tmp_path / "absent.json")
    assert "+4.0 Dice points on the frozen probe, -2.0 after fine-tuning" in absent
    assert "python benchmarks/pretraining_benefit.py" in absent
    measured = tmp_path / "benchmark.json"
    measured.write_text(json.dumps({"probe": {"scratch_swin": {"dice": [0.20, 0.22, 0.21]},
                                              "voco": {"dice": [0.25, 0.26, 0.24]}}}))
    verdict = demo_verdict(rows, measured)
    assert "over 3 seeds: VoCo - scratch +4.0 probe Dice points (per seed +5.0 / +4.0 / +3.0)" in verdict
    assert str(tmp_path / "benchmark.md") in verdict


def test_benchmark_check_takes_another_datalist(tmp_path, capsys):
    """Issue 17 item 2: the check's hint pointed at a datalist option that was silently ignored."""
    from voco.benchmark.phantom_tasks import prepare_phantom_task
    from voco.benchmark.registry import get_task

    folder = tmp_path / "phantom-seg"
    prepare_phantom_task("phantom-seg", folder, n=3, n_validation=1)
    own = folder / get_task("phantom-seg").datalist_file
    own.rename(folder / "my_split.json")
    with pytest.raises(SystemExit) as exit_info:
        voco(capsys, "benchmark", "check", "phantom-seg", str(folder), "--voxels", "False")
    out = capsys.readouterr().out
    assert exit_info.value.code == 1 and "does not exist" in out and "give another with --datalist FILE." in out
    code, out, _ = voco(capsys, "benchmark", "check", "phantom-seg", str(folder), "--datalist", "my_split.json")
    assert code == 0, out
    code, _, err = voco(capsys, "benchmark", "run", "phantom-seg,phantom-cls", "--config", "smoke", "--datalist",
                        "my_split.json")
    assert code == 2 and "--datalist my_split.json names the datalist of one task; run the tasks phantom-seg, " \
                         "phantom-cls one at a time." in err
