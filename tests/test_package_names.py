"""The installed names cannot be shadowed: from a folder holding its own `training/` and `model_cards/` packages (ML
projects often have one), this package's code and commands still use its own, and the user's stay the user's.

The folders `training/` and `model_cards/` install as `metaembed_training` and `metaembed_model_cards`
(pyproject.toml's package-dir). Before, `from training import ContrastiveDataset` inside `metaembed.quickstart`
resolved to the user's package (ImportError), and its submodules could come from either package.
"""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

CHECK = textwrap.dedent(
    """
    import sys
    from pathlib import Path

    import training, model_cards                      # the user's own
    assert training.OWNER == "user" and model_cards.OWNER == "user"
    from metaembed.quickstart import job              # imports this package's training and cards
    import metaembed_training.train, metaembed_training.evaluation
    from metaembed_training import ContrastiveDataset, MetaEmbedTrainer
    from metaembed_model_cards import write_model_card
    root = Path(sys.argv[1])
    assert Path(metaembed_training.__file__).parent == root / "training", metaembed_training.__file__
    # Nothing of this package was loaded under the user's names: no mix of the two.
    mixed = sorted(name for name in sys.modules if name.split(".")[0] in ("training", "model_cards") and "." in name)
    assert mixed == [], mixed
    print("ok")
    """
)


def user_project(tmp_path: Path) -> Path:
    for name in ("training", "model_cards"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "__init__.py").write_text('OWNER = "user"\n')
    return tmp_path


def run(args, cwd) -> subprocess.CompletedProcess:
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    return subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_this_packages_code_uses_its_own_training_beside_a_users_training(tmp_path):
    result = run([sys.executable, "-c", CHECK, str(ROOT)], user_project(tmp_path))
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-3000:]


def test_the_commands_run_from_a_folder_with_its_own_training(tmp_path):
    folder = user_project(tmp_path)
    bin_dir = Path(sys.executable).parent
    for command in (["metaembed", "--help"], ["metaembed-train", "--help"]):
        result = run([str(bin_dir / command[0]), *command[1:]], folder)
        assert result.returncode == 0, (command, result.stderr[-2000:])
    result = run([sys.executable, "-m", "metaembed_training.train", "--help"], folder)
    assert result.returncode == 0 and "--config" in result.stdout, result.stderr[-2000:]
