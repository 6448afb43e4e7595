import pytest

from fastppo.ppo.config import PPOConfig
from fastppo.runtime.errors import InputError


@pytest.mark.parametrize(
    "overrides, field",
    [
        ({"steps": 0}, "steps"),
        ({"steps": "ten"}, "steps"),
        ({"learning_rate": -1.0}, "learning_rate"),
        ({"gamma": 1.5}, "gamma"),
        ({"kl_estimator": "k9"}, "kl_estimator"),
        ({"critic": "both"}, "critic"),
        ({"rollout_batch_size": 10, "mini_batch_size": 4}, "mini_batch_size"),
        ({"mini_batch_size": 4, "micro_batch_size": 3}, "micro_batch_size"),
        ({"policy_model": "/no/such/model"}, "policy_model"),
        ({"prompts": "/no/such/prompts.jsonl"}, "prompts"),
        ({"reference": "adapter"}, "reference"),
        ({"top_p": 0.0}, "top_p"),
        ({"dual_clip": 0.5}, "dual_clip"),
        ({"whiten_advantages": "yes"}, "whiten_advantages"),
        ({"precision": "fp16"}, "precision"),
        ({"adaptive_kl_target": 6.0, "kl_in_reward": False, "kl_loss_coef": 0.01}, "adaptive_kl_target"),
        ({"adaptive_kl_target": 6.0, "kl_coef": 0.0}, "adaptive_kl_target"),
        ({"reference": "adapter", "lora_rank": 4, "reference_quantization": "8bit"}, "reference_quantization"),
        ({"advantage_estimator": "rloo", "samples_per_prompt": 2, "critic": "separate"}, "critic"),
    ],
)
def test_validation_names_the_field(overrides, field):
    with pytest.raises(InputError, match=field):
        PPOConfig(**overrides).validate()


def test_defaults_are_valid_and_every_field_documented():
    import dataclasses

    PPOConfig().validate()
    for f in dataclasses.fields(PPOConfig):
        assert f.metadata.get("help"), f"{f.name} has no help string"


def test_yaml_with_overrides(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("steps: 5\nkl_coef: 0.1\nstop_strings: ['###']\n")
    config = PPOConfig.from_yaml(str(path), ["steps=7", "adaptive_kl_target=6.0", "reward_model=my_mod:score"])
    assert (config.steps, config.kl_coef, config.adaptive_kl_target, config.stop_strings) == (7, 0.1, 6.0, ["###"])
    config.validate()  # a module:function reward is not a path


def test_yaml_errors(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("stepz: 5\n")
    with pytest.raises(InputError, match="unknown key.*stepz"):
        PPOConfig.from_yaml(str(path))
    with pytest.raises(InputError, match="does not exist"):
        PPOConfig.from_yaml(str(tmp_path / "missing.yaml"))
    path.write_text("steps: [1, 2\n")
    with pytest.raises(InputError, match="not valid YAML"):
        PPOConfig.from_yaml(str(path))
    path.write_text("steps: 5\n")
    with pytest.raises(InputError, match="key=value"):
        PPOConfig.from_yaml(str(path), ["steps"])


def test_example_config_names_every_required_key():
    import yaml

    keys = set(yaml.safe_load(open("examples/ppo.yaml")))
    required = """policy_model reward_model prompts output_dir steps rollout_batch_size mini_batch_size ppo_epochs
    max_prompt_length max_new_tokens learning_rate kl_coef adaptive_kl_target kl_estimator gamma lam clip_range
    clip_range_value vf_coef critic reference reference_quantization reward_quantization lora_rank seed save_every
    resume_from""".split()
    assert set(required) <= keys
    assert keys <= PPOConfig.field_names()


@pytest.mark.parametrize("name", ["grpo", "vapo"])
def test_estimator_example_configs_are_valid(name):
    import yaml

    values = yaml.safe_load(open(f"examples/{name}.yaml"))
    for path_key in ("policy_model", "reward_model", "prompts"):  # placeholders
        values.pop(path_key)
    PPOConfig.from_dict(values).validate()
