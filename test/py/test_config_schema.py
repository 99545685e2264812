"""Python's config readers take their defaults and per-field checks from the exported schema
(py/ampipe/config.schema.json): one set of defaults, every section. (That TypeScript resolves
configs the same way is test/ts/config/cross-language.test.ts.)"""

from __future__ import annotations

import dataclasses

import pytest

from ampipe.config_schema import SECTIONS, ConfigError, defaults, field_names, resolve_section
from ampipe.experiment_config import resolve_config
from ampipe.model.config import ModelConfig
from ampipe.train.config import DataConfig, TrainConfig


@pytest.mark.parametrize("cls, section", [(ModelConfig, "model"), (TrainConfig, "train"), (DataConfig, "data")])
def test_the_dataclasses_have_the_schemas_fields_and_defaults(cls, section):
    fields = [f for f in dataclasses.fields(cls) if not f.name.startswith("_")]
    assert [f.name for f in fields] == field_names(section)
    assert {f.name: f.default for f in fields} == defaults(section)


def test_every_section_resolves_to_the_schemas_defaults():
    assert set(SECTIONS) == {"model", "parallelism", "pipeline", "run", "data", "train", "bench"}
    for s in SECTIONS:
        assert resolve_section({}, s) == defaults(s)
    # one default for the seed (run_block read 0, ampipe train 1234)
    assert resolve_section({"run": {"steps": 2}}, "run") == {**defaults("run"), "steps": 2}
    assert defaults("run")["seed"] == 1234
    assert resolve_section(None, "parallelism")["expert_model_parallel_size"] == 2


def test_section_fields_are_checked_by_the_schema_naming_the_field():
    with pytest.raises(ConfigError) as e:
        resolve_section({"run": {"seed": -1}}, "run")
    assert str(e.value) == "run.seed: must be an integer >= 0; got -1"
    with pytest.raises(ConfigError, match=r"^pipeline\.emulated_comm\.bandwidth_gbps: must be a number > 0; got 0"):
        resolve_section({"pipeline": {"emulated_comm": {"latency_us": 1, "bandwidth_gbps": 0, "world_size": 2}}}, "pipeline")
    with pytest.raises(ConfigError, match=r"^pipeline\.degree: must be a positive integer or \"auto\"; got 0"):
        resolve_section({"pipeline": {"degree": 0}}, "pipeline")
    with pytest.raises(ConfigError, match=r"^parallelism\.devise: unknown field"):
        resolve_section({"parallelism": {"devise": "cpu"}}, "parallelism")
    with pytest.raises(ConfigError, match=r"^train\.lr: must be a number > 0; got 0"):
        TrainConfig(lr=0)
    # JavaScript has no integer type: 2.0 is the integer 2 on both sides
    assert TrainConfig(steps=20.0).steps == 20 and isinstance(TrainConfig(steps=20.0).steps, int)


def test_resolve_config_runs_the_checks_between_fields():
    out = resolve_config({"model": {"hidden_size": 64, "num_attention_heads": 2}})
    assert out["model"]["kv_channels"] == 32 and out["model"]["num_query_groups"] == 2
    for doc, field in [({"parallelism": {"backend": "nccl"}}, "parallelism.backend"),
                       ({"parallelism": {"world_size": 3}}, "parallelism.world_size"),
                       ({"model": {"num_experts": 5}}, "model.num_experts"),
                       ({"train": {"global_batch_size": 6}}, "train.global_batch_size"),
                       ({"pipeline": {"degree": 300}}, "pipeline.degree"),
                       ({"pipeline": {"boundaries": [0, 300, 256]}}, "pipeline.boundaries"),
                       ({"pipeline": {"capacity_scope": "sequence"}}, "pipeline.capacity_scope"),
                       ({"modle": {}}, "modle")]:
        with pytest.raises(ConfigError) as e:
            resolve_config(doc)
        assert e.value.field == field, doc
