"""One user-error base: every error that is the user's to fix is a ``transmem.errors.UserError``
carrying the file or key it names, and the command line catches that one class."""
import pytest

from transmem.errors import UserError


def test_every_user_error_class_derives_from_the_one_base():
    from transmem.api import RunFolderError
    from transmem.baselines import BaselineUnavailable
    from transmem.config import ConfigError
    from transmem.data import DataError
    from transmem.errors import ChoiceError, Diverged, WrongKind
    from transmem.files import FolderBusy, OutputPathError
    from transmem.training.checkpoints import CheckpointError, DamagedCheckpoint
    from transmem.transfer import TeacherMismatch
    from transmem.zoo import ZooError
    classes = [ConfigError, DataError, OutputPathError, FolderBusy, RunFolderError, TeacherMismatch, ZooError,
               CheckpointError, DamagedCheckpoint, BaselineUnavailable, ChoiceError, Diverged, WrongKind]
    assert [c for c in classes if not issubclass(c, UserError)] == []
    # and they keep the built-in base they had, for callers that catch that
    assert issubclass(ConfigError, ValueError) and issubclass(CheckpointError, RuntimeError)
    assert issubclass(Diverged, FloatingPointError)


def test_the_error_carries_the_file_or_key_it_names(tmp_path):
    from transmem import zoo
    from transmem.config import ConfigError, load_experiment
    from transmem.data import DataError
    with pytest.raises(ConfigError) as e:
        load_experiment(None, {"train.steps": "0"})
    assert e.value.where == "train.steps"
    with pytest.raises(ConfigError) as e:
        load_experiment(None, {"transfer.distiller_kernel": "2"})
    assert e.value.where == "transfer.distiller_kernel"
    with pytest.raises(zoo.ZooError) as e:
        zoo.load_entry(tmp_path / "absent", root=tmp_path)
    assert e.value.where == str(tmp_path / "absent")
    assert DataError(tmp_path / "x.npy", "bad\nlayout").where == str(tmp_path / "x.npy")
    assert str(DataError(tmp_path / "x.npy", "bad\nlayout")) == f"{tmp_path / 'x.npy'}: bad layout"
    assert UserError("no place named here").where is None
    assert UserError("x: y", where="k").where == "k"


def test_the_cli_catches_the_base_class_in_one_line(monkeypatch, capsys):
    """Any UserError -- including one of a class the CLI has never heard of -- ends in one line and
    exit status 2; any other exception is a bug and is raised."""
    from transmem import cli

    class Unheard(UserError):
        pass

    def boom(*a, **k):
        raise Unheard("somewhere.yaml: a problem\nsplit over lines")
    monkeypatch.setattr(cli, "_dispatch", boom)
    assert cli.main(["models"]) == 2
    assert capsys.readouterr().err == "transmem: error: somewhere.yaml: a problem split over lines\n"

    def bug(*a, **k):
        raise KeyError("a bug")
    monkeypatch.setattr(cli, "_dispatch", bug)
    with pytest.raises(KeyError):
        cli.main(["models"])


def test_a_transfer_model_where_a_backbone_goes_is_refused_by_its_kind():
    from transmem.config import ConfigError, load_experiment
    from transmem.errors import WrongKind
    from transmem.models import build_model
    with pytest.raises(ConfigError, match="model.name: a 'tmu' model .*not a backbone"):
        load_experiment(None, {"model.name": "tmu"})
    with pytest.raises(WrongKind, match="teacher: a 'tmu' model"):
        build_model("tmu", {}, kind="backbone", where="teacher")
    a, b = build_model("convlstm", {"hidden": 4}, seed=3), build_model("convlstm", {"hidden": 4}, seed=3)
    assert all((p == q).all() for p, q in zip(a.parameters(), b.parameters()))  # a function of the seed
