"""The `idengine` command: exit codes and messages for bad input, and a real prepare + report through the CLI."""

import json

from conftest import REPO

from idengine.cli import main


def test_prepare_and_report_through_the_cli(tmp_path):
    out = tmp_path / "prepared"
    assert main(["prepare", "--config", str(REPO / "jobs/configs/tiny-cpu.yaml"), "--out", str(out),
                 f"data.sequences={REPO / 'examples/12s-fish-mini/sequences.fasta.gz'}",
                 f"data.labels={REPO / 'examples/12s-fish-mini/labels.csv'}"]) == 0
    report = json.loads((out / "prepare_report.json").read_text())
    assert report["records_read"] == 415
    assert main(["report", str(out)]) == 0
    assert (out / "report.html").exists()


def test_broken_input_exits_2_with_a_message_naming_the_file(tmp_path, caplog):
    fasta = tmp_path / "seqs.fasta"
    fasta.write_text("ACGT\n>r1\nACGT\n")
    labels = tmp_path / "labels.csv"
    labels.write_text("id,species\nr1,A b\n")
    code = main(["prepare", "--out", str(tmp_path / "p"), f"data.sequences={fasta}", f"data.labels={labels}"])
    assert code == 2
    assert str(fasta) in caplog.text
    assert not (tmp_path / "p").exists()


def test_unknown_override_exits_2(tmp_path, caplog):
    assert main(["prepare", "--out", str(tmp_path / "p"), "train.nope=1"]) == 2
    assert "unknown key" in caplog.text
