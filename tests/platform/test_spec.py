"""The cluster spec from the command line and from `--config cluster.yaml`."""

from __future__ import annotations

from pathlib import Path

import pytest

from deepflow.api.cli import build_spec, parse_size
from deepflow.cli import build_parser
from deepflow.platform.spec import ClusterSpec, load_config


def test_several_models_from_the_command_line(smollm2_dir: Path, tmp_path: Path) -> None:
    argv = ["serve", "--model", str(smollm2_dir), "--model", str(smollm2_dir), "--served-model-name", "a"]
    argv += [
        "--served-model-name",
        "b",
        "--tes",
        "2",
        "--policy",
        "locality",
        "--jes",
        "2",
        "--dtype",
        "float32",
    ]
    spec = build_spec(build_parser().parse_args(argv))
    assert [(m.name, m.tes, m.policy, m.engine.dtype) for m in spec.models] == [
        ("a", 2, "locality", "float32"),
        ("b", 2, "locality", "float32"),
    ]
    assert spec.job_executors == 2 and spec.total_tes == 4
    assert [(te_id, m.name) for te_id, m, _ in spec.te_ids()] == [("te-0", "a"), ("te-1", "a"), ("te-2", "b"),
                                                               ("te-3", "b")]  # fmt: skip
    assert ClusterSpec.decode(spec.encode()) == spec  # what the CM and JEs receive
    with pytest.raises(ValueError, match="unique"):
        build_spec(
            build_parser().parse_args(["serve", "--model", str(smollm2_dir), "--model", str(smollm2_dir)])
        )
    with pytest.raises(FileNotFoundError):
        build_spec(build_parser().parse_args(["serve", "--model", str(tmp_path)]))


def test_cluster_yaml(smollm2_dir: Path, tmp_path: Path) -> None:
    config = tmp_path / "cluster.yaml"
    config.write_text(
        f"""
port: 9100
job_executors: 2
models:
  - name: smol
    model: {smollm2_dir}
    tes: 2
    policy: round_robin
    engine:
      dtype: float32
      kv_cache_memory: 256MiB
      max_num_seqs: 8
  - name: smol-cached
    model: {smollm2_dir}
"""
    )
    spec = load_config(config, parse_size)
    assert spec.port == 9100 and spec.job_executors == 2
    smol, cached = spec.models
    assert (smol.name, smol.tes, smol.policy) == ("smol", 2, "round_robin")
    assert smol.engine.kv_cache_memory == 256 << 20 and smol.engine.max_num_seqs == 8
    assert smol.engine.model == str(smollm2_dir)
    assert (cached.tes, cached.policy, cached.engine.dtype) == (1, "combined", "bfloat16")
    args = build_parser().parse_args(["serve", "--config", str(config), "--log-level", "warning"])
    assert build_spec(args).models == spec.models


@pytest.mark.parametrize(
    ("text", "error"),
    [
        ("models: []", "no model"),
        ("models:\n  - model: {m}\n    policy: fastest", "unknown policy"),
        ("models:\n  - model: {m}\n    engine: {{warp: 9}}", "unknown settings"),
        ("models:\n  - model: {m}\n    replicas: 2", "unknown keys"),
        ("models:\n  - model: {m}\nports: 1", "unknown keys"),
        ("models:\n  - model: {m}\n    tes: 0", "tes must be"),
        ("models:\n  - model: {m}\n    groups: [{{role: prefill, tes: 1}}]", "both prefill and decode"),
        ("models:\n  - model: {m}\n    groups: [{{role: mixer, tes: 1}}]", "unknown role"),
        ("models:\n  - model: {m}\n    groups: [{{role: decode, tes: 1}}, {{role: decode}}]", "given twice"),
        ("models:\n  - model: {m}\n    router: psychic", "unknown router"),
        ("models:\n  - model: {m}\n    router_params: {{prefer: sometimes}}", "prefer must be"),
        ("models:\n  - model: {m}\n    router_params: {{speed: 9}}", "router 'fixed'"),
        ("models:\n  - model: {m}\n    kv_transfer: {{mode: by_magic}}", "kv_transfer"),
        ("models:\n  - model: {m}\n    kv_transfer: {{lease: 3}}", "unknown settings"),
        ("models:\n  - model: {m}\n    kv_transfer: {{timeout_s: 0}}", "timeout_s"),
        ("just text", "mapping"),
    ],
)
def test_bad_cluster_yaml_is_refused_clearly(
    smollm2_dir: Path, tmp_path: Path, text: str, error: str
) -> None:
    config = tmp_path / "cluster.yaml"
    config.write_text(text.format(m=smollm2_dir))
    with pytest.raises(ValueError, match=error):
        load_config(config, parse_size)


def test_two_job_executors_by_default(smollm2_dir: Path, tmp_path: Path) -> None:
    """A JE that dies fails only the requests it held: by default another one shares the port, so a client
    retry lands on it (with one, every in-flight request failed and retries waited for the restart)."""
    spec = build_spec(build_parser().parse_args(["serve", "--model", str(smollm2_dir)]))
    assert spec.job_executors >= 2
    config = tmp_path / "cluster.yaml"
    config.write_text(f"models:\n  - model: {smollm2_dir}\n")
    assert load_config(config, parse_size).job_executors >= 2
    assert build_spec(build_parser().parse_args(["serve", "--model", str(smollm2_dir), "--jes", "1"])
                      ).job_executors == 1  # fmt: skip


def test_te_cpus_give_each_slot_its_own_cores_then_wrap() -> None:
    from deepflow.platform.spec import te_cpus

    assert te_cpus(0, 1, [0, 1]) == [0]
    assert te_cpus(1, 1, [0, 1]) == [1]
    assert te_cpus(0, 2, [4, 5, 6, 7]) == [4, 5]
    assert te_cpus(1, 2, [4, 5, 6, 7]) == [6, 7]
    assert te_cpus(2, 1, [0, 1]) == [0]  # more TEs than cores: they share, round robin
    assert te_cpus(0, 3, []) == []


def test_pd_from_the_command_line(smollm2_dir: Path) -> None:
    """`--pd 1:1` alone: one prefill and one decode TE per model and no colocated one; beside `--tes` both
    kinds. TE ids say their role (te-N colocated, te-pN prefill, te-dN decode)."""
    from deepflow.engine.kv_transfer import KVMode

    parse = build_parser().parse_args
    only_pd = build_spec(parse(["serve", "--model", str(smollm2_dir), "--pd", "1:1"]))
    (model,) = only_pd.models
    assert (model.tes, model.prefill_tes, model.decode_tes) == (0, 1, 1) and model.disaggregated
    assert [(te_id, str(role)) for te_id, _, role in only_pd.te_ids()] == [("te-p0", "prefill"),
                                                                          ("te-d0", "decode")]  # fmt: skip
    assert only_pd.total_tes == 2
    both = build_spec(
        parse(
            [
                "serve",
                "--model",
                str(smollm2_dir),
                "--tes",
                "2",
                "--pd",
                "2:1",
                "--router-param",
                "prefer=alternate",
                "--kv-transfer-mode",
                "by_layer",
            ]
        )
    )
    (model,) = both.models
    assert [(str(role), n) for role, n in model.groups()] == [("colocated", 2), ("prefill", 2), ("decode", 1)]
    assert [te_id for te_id, _, _ in both.te_ids()] == ["te-0", "te-1", "te-p0", "te-p1", "te-d0"]
    assert model.router_params == {"prefer": "alternate"} and model.kv_transfer.mode == KVMode.BY_LAYER
    assert ClusterSpec.decode(both.encode()) == both
    for bad in (["--pd", "1"], ["--pd", "0:1"], ["--pd", "a:b"], ["--tes", "0"], ["--router-param", "x"]):
        with pytest.raises(ValueError):
            build_spec(parse(["serve", "--model", str(smollm2_dir), *bad]))


def test_pd_groups_in_cluster_yaml(smollm2_dir: Path, tmp_path: Path) -> None:
    config = tmp_path / "cluster.yaml"
    config.write_text(
        f"""
models:
  - name: smol
    model: {smollm2_dir}
    groups:
      - {{role: colocated, tes: 1}}
      - {{role: prefill, tes: 1}}
      - {{role: decode, tes: 2}}
    router: fixed
    router_params: {{prefer: disaggregated}}
    kv_transfer: {{mode: by_layer, timeout_s: 5, lease_s: 7}}
  - name: pd-only
    model: {smollm2_dir}
    tes: 0
    groups: [{{role: prefill, tes: 1}}, {{role: decode, tes: 1}}]
"""
    )
    spec = load_config(config, parse_size)
    smol, pd_only = spec.models
    assert (smol.tes, smol.prefill_tes, smol.decode_tes) == (1, 1, 2)
    assert smol.router_params == {"prefer": "disaggregated"}
    assert (smol.kv_transfer.timeout_s, smol.kv_transfer.lease_s, str(smol.kv_transfer.mode)) == (
        5,
        7,
        "by_layer",
    )
    assert (pd_only.tes, pd_only.prefill_tes, pd_only.decode_tes) == (0, 1, 1)
    assert [te_id for te_id, _, _ in spec.te_ids()] == ["te-0", "te-p0", "te-p1", "te-d0", "te-d1", "te-d2"]


def test_prefill_and_decode_tes_run_with_kv_transfer_on(smollm2_dir: Path) -> None:
    from deepflow.platform.je.policies.router import TERole

    args = build_parser().parse_args(["serve", "--model", str(smollm2_dir), "--tes", "1", "--pd", "1:1"])
    (model,) = build_spec(args).models
    assert model.engine_for(TERole.COLOCATED) is model.engine and not model.engine.kv_transfer
    for role in (TERole.PREFILL, TERole.DECODE):
        engine = model.engine_for(role)
        assert engine.kv_transfer and engine.model == model.engine.model
