"""Your own model and data (models/user.py, data/tensors.py, usercode.py): a factory by
import path, ghost batch norm put into it with the built-in models' exactness, its source in
the run key, arrays from a file or a callable, packing where it applies, and every kind of
bad input failing before any work with one line."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from sgdnoise.config import ConfigError, from_dict, load_config, with_values
from sgdnoise.data.prepare import prepare
from sgdnoise.data.store import load_prepared
from sgdnoise.models.norm import GhostBatchNorm
from sgdnoise.models.user import apply_norm
from sgdnoise.pack import pack_problem
from sgdnoise.train import train

from helpers import SMALL, cli, tracking_uri, write_project

# Factories a user might write. bn_mlp is the built-in `mlp` with `batch` norm written by
# hand (same layers, same order, so the same initialisation): with model.norm ghost it must
# train exactly as the built-in mlp with ghost norm.
NETS = '''
import math

import torch
from torch import nn


def bn_mlp(input_shape, num_classes, width=32, depth=2):
    layers = [nn.Flatten()]
    fan_in = math.prod(input_shape)
    for _ in range(depth):
        layers += [nn.Linear(fan_in, width, bias=False), nn.BatchNorm1d(width), nn.ReLU(True)]
        fan_in = width
    layers.append(nn.Linear(fan_in, num_classes))
    return nn.Sequential(*layers)


def layer_norm(input_shape, num_classes):
    n = math.prod(input_shape)
    return nn.Sequential(nn.Flatten(), nn.Linear(n, 16), nn.LayerNorm(16), nn.ReLU(),
                         nn.Linear(16, num_classes))


class Centred(nn.Module):
    """Subtracts the batch mean: it mixes examples, so a pack would mix its members."""

    def __init__(self, n, k):
        super().__init__()
        self.fc = nn.Linear(n, k)

    def forward(self, x):
        x = x.flatten(1)
        return self.fc(x - x.mean(0, keepdim=True))


def mixing(input_shape, num_classes):
    return Centred(math.prod(input_shape), num_classes)


def autoencoder(input_shape, num_classes):
    n = math.prod(input_shape)
    return nn.Sequential(nn.Linear(n, 8), nn.ReLU(), nn.Linear(8, n))


def raises(input_shape, num_classes):
    raise ValueError("this factory does not like these inputs")


def not_a_module(input_shape, num_classes):
    return 42


def wrong_output(input_shape, num_classes):
    return nn.Sequential(nn.Flatten(), nn.Linear(math.prod(input_shape), num_classes + 1))
'''

LOADERS = """
import numpy as np


def load():
    rng = np.random.default_rng(0)
    return {"train_x": rng.normal(size=(64, 5)), "train_y": rng.integers(0, 3, 64),
            "test_x": rng.normal(size=(32, 5)), "test_y": rng.integers(0, 3, 32)}


def broken():
    raise RuntimeError("the data server is down")
"""


# SMALL with a user model: the built-in mlp's layers with batch norm, as ghost batch norm.
BASE = {**SMALL, "model": {"name": "nets.py:bn_mlp", "norm": "ghost", "ghost_batch_size": 16}}


def user_project(root: Path, params: dict | None = None) -> Path:
    write_project(root, params if params is not None else BASE)
    (root / "nets.py").write_text(NETS)
    (root / "loaders.py").write_text(LOADERS)
    return root


def arrays(n_train: int = 96, n_test: int = 48, d: int = 6, classes: int = 3, seed: int = 0):
    rng = np.random.default_rng(seed)
    return {
        "train_x": rng.normal(size=(n_train, d)).astype(np.float32),
        "train_y": rng.integers(0, classes, n_train),
        "test_x": rng.normal(size=(n_test, d)).astype(np.float32),
        "test_y": rng.integers(0, classes, n_test),
    }


# ---------------------------------------------------------------------------------------
# Ghost batch norm on a user model


def _max_rel_err(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], keys=None) -> float:
    keys = keys or a.keys()
    return max(
        ((a[k].double() - b[k].double()).norm() / a[k].double().norm().clamp_min(1e-30)).item()
        for k in keys
    )


def test_ghost_norm_on_a_user_model_equals_built_in_ghost_norm_under_accumulation(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = user_project(tmp_path / "proj")
    monkeypatch.chdir(root)  # file.py:callable is relative to the project root
    common = {"model.ghost_batch_size": 16, "train.batch_size": 64, "train.budget.value": 5,
              "train.lr_eff": 0.5}  # fmt: skip
    user = {**common, "model.name": "nets.py:bn_mlp", "model.kwargs": {"width": 32},
            "model.width": None}  # fmt: skip

    def run(**values):
        cfg = from_dict(with_values(SMALL, values), num_processes=1)
        return train(cfg, root=root, track=False, keep_state=True)

    whole = run(**user, **{"model.norm": "ghost"})
    # The user's BatchNorm1d layers became ghost batch norm of the same shape ...
    builtin = run(**common, **{"model.name": "mlp", "model.width": 32, "model.norm": "ghost"})
    assert whole.state.keys() == builtin.state.keys()
    assert _max_rel_err(builtin.state, whole.state) <= 1e-5
    # ... with its exactness: accumulation gives the same run, running statistics included.
    for micro in (32, 16):
        split = run(**user, **{"model.norm": "ghost", "train.micro_batch_size": micro})
        assert _max_rel_err(whole.state, split.state) <= 1e-5, micro
        assert split.run_key == whole.run_key
    # The check can fail: the model as written (plain batch norm) is not split-invariant.
    bn_whole = run(**user, **{"model.norm": "batch"})
    bn_split = run(**user, **{"model.norm": "batch", "train.micro_batch_size": 32})
    params = [k for k in bn_whole.state if "running" not in k and "tracked" not in k]
    assert _max_rel_err(bn_whole.state, bn_split.state, params) > 1e-4


def test_ghost_replacement_keeps_shape_settings_and_state() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, eps=1e-3, momentum=0.2), nn.ReLU(),
        nn.Flatten(), nn.Linear(4 * 6 * 6, 8), nn.BatchNorm1d(8, affine=False),
    )  # fmt: skip
    with torch.no_grad():
        model[1].weight.uniform_(0.5, 1.5)
        model[1].running_mean.normal_()
        model[1].num_batches_tracked.fill_(7)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ghost = apply_norm(model, "ghost", 4)
    for i, (eps, momentum, affine) in ((1, (1e-3, 0.2, True)), (5, (1e-5, 0.1, False))):
        layer = ghost[i]
        assert isinstance(layer, GhostBatchNorm) and layer.ghost_batch_size == 4
        assert (layer.eps, layer.momentum, layer.affine) == (eps, momentum, affine)
    after = ghost.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], before[k]) for k in before)
    # Kinds without a ghost form are named.
    with pytest.raises(ConfigError) as e:
        apply_norm(nn.Sequential(nn.Conv3d(1, 2, 1), nn.BatchNorm3d(2)), "ghost", 4)
    assert e.value.key == "model.norm" and "1 (BatchNorm3d)" in e.value.problem


# ---------------------------------------------------------------------------------------
# Identity: the model's source and kwargs are in the run key


def test_editing_the_user_model_changes_the_run_key(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = user_project(tmp_path / "proj")
    monkeypatch.chdir(root)
    nets = root / "nets.py"

    def key(*extra: str) -> str:
        return load_config(None, ["model.name=nets.py:bn_mlp", "model.norm=batch", *extra]).run_key

    original = key()
    assert key() == original  # stable
    assert key("model.kwargs.width=16") != original  # the kwargs count
    nets.write_text(NETS + "\n# one comment more: another source, so other runs\n")
    edited = key()
    assert edited != original
    nets.write_text(NETS)
    assert key() == original
    # The built-in models' keys are as they were: the new keys count only when set.
    base = from_dict({})
    assert set(base.identity()["model"]) == {"name", "norm", "ghost_batch_size", "depth", "width"}
    assert set(base.identity()["data"]) == {"name", "num_samples", "train_split", "seed"}


def test_a_run_records_its_model_source_and_an_edit_makes_a_new_run(
    tmp_path: Path, mlflow_template: Path
) -> None:
    params = with_values(BASE, {"model.norm": "batch", "model.kwargs": {"width": 16},
                                "train.budget.value": 2})  # fmt: skip
    root = user_project(tmp_path / "proj", params)
    (root / "mlflow.db").write_bytes(mlflow_template.read_bytes())
    first = cli(root, "train", "--json")
    assert first.returncode == 0, first.stderr
    (root / "nets.py").write_text(NETS + "\n# edited\n")
    second = cli(root, "train", "--json")
    assert second.returncode == 0, second.stderr
    runs = [json.loads(r.stdout.strip().splitlines()[-1]) for r in (first, second)]
    assert runs[0]["run_key"] != runs[1]["run_key"]

    from mlflow.tracking import MlflowClient

    mlf = MlflowClient(tracking_uri=tracking_uri(root))
    sources = [hashlib.sha256(NETS.encode()).hexdigest(),
               hashlib.sha256((NETS + "\n# edited\n").encode()).hexdigest()]  # fmt: skip
    for run, source in zip(runs, sources, strict=True):
        got = mlf.get_run(run["run_id"]).data
        assert got.tags["sgdnoise.model_source_sha256"] == source
        assert got.params["model.source_sha256"] == source
        assert got.params["model.kwargs.width"] == "16"
        assert got.params["model.name"] == "nets.py:bn_mlp"


# ---------------------------------------------------------------------------------------
# User data


def test_a_pt_an_npz_and_a_folder_of_npy_prepare_the_same_tensors(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    a = arrays()
    checksums = {}
    for form in ("data.pt", "data.npz", "data_npy"):
        root = user_project(tmp_path / form.replace(".", "_"))
        monkeypatch.chdir(root)
        if form.endswith(".pt"):
            torch.save({k: torch.from_numpy(v) for k, v in a.items()}, root / form)
        elif form.endswith(".npz"):
            np.savez(root / form, **a)
        else:
            (root / form).mkdir()
            for k, v in a.items():
                np.save(root / form / f"{k}.npy", v)
        cfg = load_config(None, ["data.name=tensors", f"data.path={form}"])
        data = load_prepared(prepare(cfg.data, root))
        assert data.meta["num_classes"] == 3 and data.input_shape == (6,)
        assert torch.equal(data.train_x, torch.from_numpy(a["train_x"]))
        assert torch.equal(data.test_y, torch.from_numpy(a["test_y"]).long())
        checksums[form] = data.checksum
    assert len(set(checksums.values())) == 1, checksums


def test_a_callable_normalization_and_reconstruction(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = user_project(tmp_path / "proj")
    monkeypatch.chdir(root)
    cfg = load_config(None, ["data.name=loaders.py:load", "data.normalize=channel"])
    folder = prepare(cfg.data, root)
    assert folder.name == "loaders.py-load"
    data = load_prepared(folder)
    assert data.num_classes == 3 and data.meta["normalization"]["at"] == "prepare"
    assert torch.allclose(data.train_x.mean(0), torch.zeros(5), atol=1e-5)
    assert torch.allclose(data.train_x.std(0, unbiased=False), torch.ones(5), atol=1e-4)
    # Inputs only: the model reconstructs them (test loss, no accuracy).
    a = arrays()
    np.savez(root / "inputs.npz", train_x=a["train_x"], test_x=a["test_x"])
    values = {"data.name": "tensors", "data.path": "inputs.npz", "train.batch_size": 16,
              "model.name": "nets.py:autoencoder", "model.norm": "none",
              "train.budget.value": 3}  # fmt: skip
    result = train(from_dict(with_values(BASE, values)), root=root, track=False)
    assert result.status == "finished"
    assert "final_test_loss" in result.metrics and "final_test_accuracy" not in result.metrics


def test_editing_the_data_file_prepares_it_again_and_changes_the_run_key(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = user_project(tmp_path / "proj")
    monkeypatch.chdir(root)
    np.savez(root / "data.npz", **arrays(seed=0))
    cfg = load_config(None, ["data.name=tensors", "data.path=data.npz"])
    first = load_prepared(prepare(cfg.data, root)).checksum
    np.savez(root / "data.npz", **arrays(seed=1))
    edited = load_config(None, ["data.name=tensors", "data.path=data.npz"])
    assert edited.run_key != cfg.run_key
    assert load_prepared(prepare(edited.data, root)).checksum != first


# ---------------------------------------------------------------------------------------
# Packing


def test_packing_applies_to_user_models_whose_layers_and_forward_allow_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = user_project(tmp_path / "proj")
    monkeypatch.chdir(root)

    def problem(name: str, norm: str = "none") -> str | None:
        return pack_problem(load_config(None, [f"model.name={name}", f"model.norm={norm}"]),
                            (40,), 10)  # fmt: skip

    assert problem("nets.py:bn_mlp", "ghost") is None
    assert "LayerNorm" in (problem("nets.py:layer_norm") or "")
    assert "mix examples along the batch axis" in (problem("nets.py:mixing") or "")


def _sweep_params(model: dict) -> dict:
    study = {
        "fixed": {"train.budget.unit": "steps", "train.budget.value": 5},
        "grid": {"train.lr_eff": [0.05, 0.1], "train.seed": [0, 1]},
        "metric": {"name": "final_test_accuracy", "direction": "maximize"},
        "edges": {"extend": False},
    }
    return {**SMALL, "model": model, "studies": {"s": study}}


def test_the_sweep_says_once_which_model_cannot_be_packed_and_why(
    tmp_path: Path, mlflow_template: Path
) -> None:
    root = user_project(tmp_path / "ln", _sweep_params({"name": "nets.py:layer_norm"}))
    (root / "mlflow.db").write_bytes(mlflow_template.read_bytes())
    res = cli(root, "sweep", "s", "--workers", "2")
    assert res.returncode == 0, res.stderr
    said = [line for line in res.stderr.splitlines() if "cannot be packed" in line]
    assert len(said) == 1, res.stderr
    assert "nets.py:layer_norm" in said[0] and "LayerNorm" in said[0], said[0]
    assert "one by one" in said[0] and "pack of" not in res.stderr
    # A packable user model trains in packs, and nothing is said.
    root = user_project(tmp_path / "bn", _sweep_params(
        {"name": "nets.py:bn_mlp", "norm": "ghost", "ghost_batch_size": 16}))  # fmt: skip
    (root / "mlflow.db").write_bytes(mlflow_template.read_bytes())
    res = cli(root, "sweep", "s", "--workers", "2")
    assert res.returncode == 0, res.stderr
    assert "cannot be packed" not in res.stderr and "pack of 2" in res.stderr, res.stderr


# ---------------------------------------------------------------------------------------
# Bad input: one line naming the key, exit 2, nothing written


def _npz(**overrides):
    def write(root: Path) -> None:
        a = {**arrays(), **overrides}
        np.savez(root / "bad.npz", **{k: v for k, v in a.items() if v is not None})

    return write


def _broken_module(root: Path) -> None:
    (root / "broken.py").write_text("import a_dependency_that_is_not_installed\n")


TENSORS = ["-P", "data.name=tensors", "-P", "data.path=bad.npz"]
BAD = [
    # (name, files to write, arguments, key, what the line says)
    ("import", None, ["-P", "model.name=no_such_package.nets:make"], "model.name",
     "cannot import no_such_package.nets"),
    ("import_error", _broken_module, ["-P", "model.name=broken.py:make"], "model.name",
     "ModuleNotFoundError"),
    ("no_attribute", None, ["-P", "model.name=nets.py:make_net"], "model.name",
     "no attribute 'make_net'"),
    ("raises", None, ["-P", "model.name=nets.py:raises"], "model.name",
     "raised ValueError: this factory does not like these inputs"),
    ("not_a_module", None, ["-P", "model.name=nets.py:not_a_module"], "model.name",
     "returned a value of type int, not an nn.Module"),
    ("wrong_output", None, ["-P", "model.name=nets.py:wrong_output", "-P", "model.norm=none"],
     "model.name", "to (2, 11)"),
    ("norm_none_with_bn", None, ["-P", "model.norm=none"], "model.norm",
     "2 (BatchNorm1d), 5 (BatchNorm1d)"),
    ("ghost_without_bn", None, ["-P", "model.name=nets.py:layer_norm"], "model.norm",
     "no BatchNorm1d/BatchNorm2d"),
    ("kwargs_of_builtin", None, ["-P", "model.name=mlp", "-P", "model.kwargs.width=3"],
     "model.kwargs", "mlp takes no"),
    ("size_of_user_model", None, ["-P", "model.width=64"], "model.width", "is not used"),
    ("missing_file", None, ["-P", "data.name=tensors", "-P", "data.path=nowhere.npz"],
     "data.path", "does not exist"),
    ("not_a_data_file", lambda r: (r / "bad.csv").write_text("1,2\n"),
     ["-P", "data.name=tensors", "-P", "data.path=bad.csv"], "data.path", "not a .pt or .npz"),
    ("missing_array", _npz(test_x=None), TENSORS, "data.path", "no test_x"),
    ("missing_labels", _npz(test_y=None), TENSORS, "data.path", "train_y but no test_y"),
    ("mismatched_lengths", _npz(train_y=np.zeros(95, dtype=np.int64)), TENSORS, "data.path",
     "train_x has 96 examples but train_y 95 labels"),
    ("label_out_of_range", _npz(), [*TENSORS, "-P", "data.num_classes=2"], "data.path",
     "label 2, out of range"),
    ("negative_label", _npz(test_y=-np.ones(48, dtype=np.int64)), TENSORS, "data.path",
     "test_y holds label -1"),
    ("float_labels", _npz(train_y=np.zeros(96)), TENSORS, "data.path", "float64"),
    ("crop_flip_on_vectors", _npz(), [*TENSORS, "-P", "data.augment=crop_flip"], "data.augment",
     "needs images"),
    ("loader_raises", None, ["-P", "data.name=loaders.py:broken"], "data.name",
     "RuntimeError: the data server is down"),
    ("path_with_builtin_data", None, ["-P", "data.path=x.npz"], "data.path", "is for user data"),
]  # fmt: skip


@pytest.mark.parametrize(("name", "write", "args", "key", "says"), BAD, ids=[b[0] for b in BAD])
def test_bad_user_input_exits_2_with_one_line_and_writes_nothing(
    tmp_path: Path, name: str, write, args: list[str], key: str, says: str
) -> None:
    root = user_project(tmp_path / "proj")
    if write is not None:
        write(root)
    before = sorted(p.name for p in root.iterdir())
    res = cli(root, "train", *args)
    assert res.returncode == 2, res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1, res.stderr
    assert lines[0].startswith(f"error: {key}: ") and "; allowed: " in lines[0], lines[0]
    assert says in lines[0], lines[0]
    # No mlflow.db, no data/, no optuna/, no __pycache__ of anything but the user's code.
    assert sorted(p.name for p in root.iterdir() if p.name != "__pycache__") == before


def test_prepare_and_sweep_refuse_bad_user_input_before_any_work(tmp_path: Path) -> None:
    root = user_project(tmp_path / "proj", _sweep_params({"name": "nets.py:not_a_module"}))
    _npz(train_y=np.zeros(95, dtype=np.int64))(root)
    before = sorted(p.name for p in root.iterdir())
    res = cli(root, "prepare", *TENSORS)
    assert res.returncode == 2 and res.stderr.startswith("error: data.path: "), res.stderr
    res = cli(root, "sweep", "s")
    assert res.returncode == 2, res.stderr
    assert res.stderr.strip().splitlines()[-1].startswith("error: model.name: "), res.stderr
    assert sorted(p.name for p in root.iterdir() if p.name != "__pycache__") == before


def test_a_study_may_sweep_the_factory_kwargs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from sgdnoise.pack import pack_key
    from sgdnoise.sweep.spec import load_spec

    root = user_project(tmp_path / "proj")
    monkeypatch.chdir(root)
    raw = _sweep_params({"name": "nets.py:bn_mlp", "norm": "ghost", "ghost_batch_size": 16})
    raw["studies"]["s"]["grid"]["model.kwargs.width"] = [8, 16]
    spec = load_spec(raw, "s")
    assert len(spec.points) == 8 and len({p.run_key for p in spec.points}) == 8
    widths = {spec.config(p.values).model.kwargs["width"] for p in spec.points}
    assert widths == {8, 16}
    # Other kwargs, another model: never in one pack.
    by_width = {w: [p for p in spec.points if p.values["model.kwargs.width"] == w] for w in (8, 16)}
    assert pack_key(spec.config(by_width[8][0].values)) != pack_key(
        spec.config(by_width[16][0].values)
    )
    with pytest.raises(ConfigError) as e:
        raw["studies"]["s"]["grid"]["model.kwarg.width"] = [8]
        load_spec(raw, "s")
    assert e.value.key == "studies.s.grid.model.kwarg.width"
