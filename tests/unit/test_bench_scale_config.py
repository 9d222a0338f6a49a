"""The scale benchmark carries its own healthcare settings (an installed tip_fed has no configs/):
they must stay the scenario the repository's configs/healthcare.toml describes."""

from pathlib import Path

from simulations.settings import load_config
from tip_fed.bench import scale

ROOT = Path(__file__).resolve().parents[2]


def test_scale_benchmark_config_is_the_repository_healthcare_config(tmp_path):
    written = load_config(scale.write_config(tmp_path / "healthcare.toml"))
    assert written.to_dict() == load_config(ROOT / "configs" / "healthcare.toml").to_dict()
    assert written.scenario == "healthcare" and written.projection.rank == "auto"


def test_scale_benchmark_reads_no_file_beside_its_source():
    # what broke once installed: a path built from the module's own location into the checkout
    assert "__file__" not in Path(scale.__file__).read_text()
