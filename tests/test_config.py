import pytest

from conftest import load_config
from difflax import config as config_lib


def test_ddpm_paper_preset_holds_ho_et_al_settings():
  c = load_config("ddpm_cifar10", "paper")
  assert c.data.name == "cifar10" and c.data.batch_size == 128
  assert (c.diffusion.schedule, c.diffusion.num_timesteps) == ("linear", 1000)
  assert tuple(c.model.ch_mult) == (1, 2, 2, 2) and c.model.ch == 128
  assert c.model.num_res_blocks == 2 and tuple(c.model.attn_resolutions) == (16,)
  assert c.model.dropout == 0.1 and c.optim.lr == 2e-4 and c.optim.ema_decay == 0.9999
  assert c.optim.grad_clip == 1.0 and c.optim.warmup_steps == 5000
  config_lib.validate(c)


def test_iddpm_paper_preset_holds_nichol_dhariwal_settings():
  c = load_config("iddpm_cifar10", "paper")
  assert (c.diffusion.schedule, c.diffusion.num_timesteps) == ("cosine", 4000)
  assert c.diffusion.var_type == "learned_range" and c.loss.type == "hybrid"
  assert c.loss.vlb_weight == 0.001 and c.model.num_res_blocks == 3
  assert c.model.dropout == 0.3 and c.optim.lr == 1e-4 and c.data.batch_size == 128
  config_lib.validate(c)


def test_default_presets_are_offline_and_valid():
  for name in ("ddpm_cifar10", "iddpm_cifar10"):
    c = load_config(name, "")
    assert c.data.name == "embedded"
    config_lib.validate(c)


def test_bad_presets_and_shorthands_are_named():
  with pytest.raises(ValueError, match="papr"):
    load_config("ddpm_cifar10", "papr")
  with pytest.raises(ValueError, match="stepz"):
    load_config("ddpm_cifar10", "stepz=3")
  assert load_config("ddpm_cifar10", "tiny,num_steps=7").train.num_steps == 7


def test_locked_config_rejects_unknown_keys():
  from difflax import config as config_lib
  c = config_lib.load("ddpm_cifar10:tiny")
  with pytest.raises(AttributeError, match="learning_rate"):
    c.optim.learning_rate = 1.0


@pytest.mark.parametrize("field,value,match", [
    ("data.resolution", 10, "divisible"),
    ("model.attn_resolutions", (3,), "attn_resolutions"),
    ("diffusion.var_type", "learned_range", "hybrid"),
    ("loss.type", "l1", "loss.type"),
    ("sample.guidance", 2.0, r"guidance=2 needs a class-conditional model"),  # unconditional
])
def test_validate_explains_inconsistent_settings(field, value, match):
  c = load_config("ddpm_cifar10", "tiny")
  block, key = field.split(".")
  c[block][key] = value
  if field == "data.resolution":
    c.model.ch_mult = (1, 2, 2)
  with pytest.raises(ValueError, match=match):
    config_lib.validate(c)


def test_chen_presets_reproduce_table_3_and_4_variants():
  c = load_config("chen_schedules", "gamma=sigmoid,start=0,end=3,tau=0.7")
  assert c.diffusion.type == "continuous" and c.diffusion.gamma == "sigmoid:start=0,end=3,tau=0.7"
  config_lib.validate(c)
  c = load_config("chen_schedules", "scale=0.5")
  assert c.diffusion.input_scale == 0.5 and c.diffusion.normalize_input
  assert c.diffusion.gamma == "cosine:start=0.2"  # Table 4's base schedule.
  c = load_config("chen_schedules", "paper,gamma=linear,scale=0.3")
  assert c.data.resolution == 64 and c.diffusion.gamma == "linear"
  config_lib.validate(c)
  bad = load_config("chen_schedules", "")
  bad.diffusion.gamma = "sigmoid:start"
  with pytest.raises(ValueError, match="name:key=value"):
    config_lib.validate(bad)


def test_ncsnv2_paper_preset_holds_song_ermon_cifar10_settings():
  c = load_config("ncsnv2_cifar10", "paper")
  n = c.ncsn
  assert (n.sigma_first, n.sigma_last, n.num_scales, n.steps_per_scale) == (50.0, 0.01, 232, 5)
  assert n.step_size == 6.2e-6 and c.optim.ema_decay == 0.999 and c.data.resolution == 32
  default = load_config("ncsnv2_cifar10", "")
  assert default.ncsn.sigma_first == 0 and default.ncsn.num_scales == 0  # From the data.
  config_lib.validate(default)


def test_cascade_presets_hold_cdm_appendix_b_and_are_valid():
  from difflax import cascade
  for name in ("cascade_32_64", "cascade_16_64", "cascade_64_256"):
    for preset in ("", "paper", "tiny"):
      c = load_config(name, preset)
      cascade.validate(c)
      first = c.stages[c.cascade.order[0]]
      assert first.data.low_res == 0
      if preset == "":
        assert all(st.data.name == "embedded" for st in c.stages.values())
  c = load_config("cascade_32_64", "paper")
  base, sr = c.stages.base, c.stages.sr_64
  for st, blocks in ((base, 6), (sr, 5)):
    assert (st.model.ch, tuple(st.model.ch_mult), st.model.num_res_blocks) == (256, (1, 2, 3, 4),
                                                                                blocks)
    assert tuple(st.model.attn_resolutions) == (8, 16) and st.model.num_heads == 4
    assert (st.diffusion.schedule, st.diffusion.num_timesteps) == ("cosine", 4000)
    assert st.diffusion.var_type == "learned_range" and st.model.class_conditional
    assert st.optim.lr == 1e-4 and st.optim.ema_decay == 0.9999 and st.data.batch_size == 2048
    assert st.model.dropout == 0.1
  assert (base.train.num_steps, sr.train.num_steps) == (700_000, 400_000)
  assert sr.data.low_res == 32 and sr.cond.aug == "gaussian"
  assert cascade.stage_config(c, "sr_64").cond.num_timesteps == 4000  # The base's process.
  c = load_config("cascade_64_256", "paper")
  top = c.stages.sr_256
  assert (top.model.ch, tuple(top.model.ch_mult), top.model.num_res_blocks) == (128, (
      1, 2, 4, 4, 8, 8), 3)
  assert top.cond.aug == "blur" and (top.cond.blur_sigma_min, top.cond.blur_sigma_max) == (0.4, 0.6)
  assert top.cond.blur_prob == 0.5 and top.diffusion.type == "continuous"
  assert top.diffusion.gamma.startswith("vp_linear") and top.sample.steps == "100"
  assert top.data.batch_size == 1024 and top.model.dropout == 0.0
  assert load_config("cascade_16_64", "s=0").stages.sr_64.cond.train_level == 0


def test_progressive_presets_hold_pro_ddpm_settings():
  c = load_config("progressive_cifar10", "paper")
  g = c.growth
  assert (g.fade_kind, g.fade_steps, g.fade_offset) == ("sinusoidal", 100, 0.7)
  assert g.trigger == "plateau" and g.plateau_patience == 15
  assert c.loss.type == "hybrid" and c.diffusion.var_type == "learned_range"
  assert c.diffusion.num_timesteps == 1000 and tuple(g.resolutions) == (4, 8, 16, 32)
  config_lib.validate(c)
  for arg in ("", "tiny", "static", "fade=linear", "fade=abrupt,forward=stage_res"):
    config_lib.validate(load_config("progressive_cifar10", arg))
  assert load_config("progressive_cifar10", "fade=linear").growth.fade_kind == "linear"


def _leaves(c, prefix=""):
  out = []
  for k, v in c.items():
    out += _leaves(v, f"{prefix}{k}.") if hasattr(v, "items") else [prefix + k]
  return out


def test_resolved_configs_keep_only_the_keys_of_features_that_are_on():
  ddpm = config_lib.load("ddpm_cifar10")
  assert len(_leaves(ddpm)) <= 90 < len(_leaves(config_lib.base_config()))
  assert len(_leaves(config_lib.finalize(config_lib.base_config()))) <= 90
  assert not {"growth", "ncsn", "cond"} & set(ddpm) and "vlb_weight" not in ddpm.loss
  assert "gamma" not in ddpm.diffusion and "num_examples" in ddpm.data  # (embedded data)
  pro = config_lib.load("progressive_cifar10:tiny")
  assert tuple(pro.growth.resolutions) == (4, 8, 16) and "ncsn" not in pro
  assert config_lib.load("ncsnv2_cifar10:tiny").ncsn.steps_per_scale > 0
  assert "gamma" in config_lib.load("chen_schedules:tiny").diffusion
  cdm = config_lib.load("cascade_32_64:tiny")
  assert "cond" not in cdm.stages.base and cdm.stages.sr_64.cond.aug == "gaussian"
  assert "growth" not in config_lib.load("progressive_cifar10:static,tiny")


def test_an_override_turns_a_feature_on_with_its_defaults_or_names_its_switch():
  c = config_lib.load("ddpm_cifar10:tiny", [("loss.timestep_sampler", "importance")])
  assert c.loss.resampler_history == 10 and c.loss.resampler_uniform_prob == 0.001
  c = config_lib.load("ddpm_cifar10:tiny", [("loss.type", "hybrid"),
                                            ("loss.vlb_weight", "0.01")])
  assert c.loss.vlb_weight == 0.01
  c = config_lib.load("ddpm_cifar10:tiny", [("growth.resolutions", "(4, 8)"),
                                            ("growth.stage_steps", "(3,)"),
                                            ("model.project_downsample", "true")])
  assert c.growth.fade_kind == "sinusoidal" and tuple(c.growth.resolutions) == (4, 8)
  with pytest.raises(config_lib.ConfigError, match=r"loss\.vlb_weight .*loss\.type='hybrid'"):
    config_lib.load("ddpm_cifar10:tiny", [("loss.vlb_weight", "0.01")])
  with pytest.raises(config_lib.ConfigError, match=r"ncsn\.num_scales .*diffusion\.type='ncsn'"):
    config_lib.load("ddpm_cifar10:tiny", [("ncsn.num_scales", "10")])
  with pytest.raises(config_lib.ConfigError, match=r"stages\.base\.cond\.sample_level .*low_res"):
    config_lib.load("cascade_32_64:tiny", [("stages.base.cond.sample_level", "3")])
  with pytest.raises(config_lib.ConfigError, match="Did you mean config.loss.vlb_weight"):
    config_lib.load("ddpm_cifar10:tiny", [("loss.vlb_wieght", "0.01")])


def test_a_recorded_resolved_config_loads_back():
  for spec in ("progressive_cifar10:tiny", "chen_schedules:tiny", "ddpm_cifar10"):
    c = config_lib.load(spec)
    again = config_lib.from_dict(c.to_dict())
    assert again.to_dict() == c.to_dict()


def test_guidance_needs_a_model_trained_with_null_labels():
  """The main job's base samples with guidance w=2 (a class-conditional model trained with 10 %
  null labels); without null labels in training the same setting is refused."""
  c = load_config("cascade_32_64", "")
  base = c.stages.base
  assert base.sample.guidance == 2.0 and base.model.class_conditional
  assert base.model.label_dropout == 0.1
  config_lib.validate(c)
  base.model.label_dropout = 0.0
  with pytest.raises(ValueError, match=r"label_dropout > 0; here True and 0\)"):
    config_lib.validate(c)
