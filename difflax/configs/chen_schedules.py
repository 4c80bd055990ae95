"""Chen (2023), "On the Importance of Noise Scheduling for Diffusion Models": continuous-time
gamma(t) schedules and input scaling, as config variants over the one train loop.

  python -m difflax.main --config=configs/chen_schedules.py --workdir=runs/chen          # CPU
  python -m difflax.main --config=configs/chen_schedules.py:gamma=sigmoid,start=0,end=3,tau=0.7 \
      --workdir=runs/chen_sigmoid
  python -m difflax.main --config=configs/chen_schedules.py:scale=0.5 --workdir=runs/chen_b05
  python -m difflax.main --config=configs/chen_schedules.py:paper,gamma=linear,scale=0.6 ...
  python -m difflax.plots --config=configs/chen_schedules.py:scale=0.5 \
      --gamma=sigmoid:start=0,end=3,tau=0.7 --out=gammas.png                  # Figures 3 and 5

Arguments (comma-separated after ':'):
  gamma=linear|cosine|sigmoid with start=, end=, tau=  Table 3's schedule families; unspecified
      parameters take Algorithm 1's defaults (the default schedule is cosine start=0.2, Table 4's).
  scale=b        input scaling x_t = sqrt(gamma) b x0 + sqrt(1 - gamma) eps (Table 4: 0.3 ... 1.0);
                 b != 1 turns on the per-example variance normalisation of x_t (Sec. 2.2).
  infer=SPEC     an inference gamma different from the training one ("sigmoid:start=0,end=3").
  pred=eps|x0|v  what the network predicts; time=t|logsnr what it is conditioned on.
  paper          ImageNet 64x64, class-conditional, the paper's study resolution (the paper's RIN
                 backbone is replaced by difflax's UNet). tiny: smoke test.

On pods (`--mode=plan`, measured with the TPU compiler, docs/plans/chen_schedules): `:paper`
(277 M params, batch 1024, bf16, fsdp 16) fits a v5e:8x8 slice (64 chips, 16 per chip) at 7.07
GiB per chip of 16 (44 % of HBM; smaller slices not planned), 117 ms per step at MFU 0.4, 0.20
days to 150k steps. Its train step took the TPU compiler 50-60 CPU-minutes here.
"""
from difflax import config as config_lib
from difflax import presets as preset_lib

PRESETS = ("paper", "tiny")
OWN_KEYS = ("gamma", "start", "end", "tau", "scale", "infer", "pred", "time")


def get_config(arg=None):
  presets, kv = preset_lib.parse_arg(arg)
  preset_lib.check_presets(presets, PRESETS, __file__)
  own = {k: kv.pop(k) for k in OWN_KEYS if k in kv}
  c = config_lib.base_config()
  d = c.diffusion
  d.type = "continuous"
  d.var_type = "fixed_small"
  c.loss.type = "simple"
  name = own.get("gamma", "cosine")
  params = {k: own[k] for k in ("start", "end", "tau") if k in own}
  if name == "cosine" and not params:
    params = {"start": "0.2"}
  d.gamma = name + (":" + ",".join(f"{k}={v}" for k, v in params.items()) if params else "")
  d.inference_gamma = own.get("infer", "")
  d.input_scale = float(own.get("scale", 1.0))
  d.normalize_input = d.input_scale != 1.0
  d.model_output = own.get("pred", "eps")
  d.time_input = own.get("time", "t")

  if "paper" in presets:
    c.data.update(name="imagenet_resized/64x64", resolution=64, num_classes=1000,
                  batch_size=1024)
    c.model.update(ch=192, ch_mult=(1, 2, 3, 4), num_res_blocks=3, attn_resolutions=(32, 16, 8),
                   head_channels=64, dropout=0.1, use_scale_shift_norm=True, num_groups=32,
                   class_conditional=True,
                   dtype="bfloat16")  # TPU training (Google's study): bf16 compute, fp32 state.
    c.mesh.fsdp = 16  # 277M params: replicated state would take 4.1 GiB of every chip.
    d.num_timesteps = 1000  # Sampling steps (the training process is continuous).
    c.optim.update(name="adamw", lr=1e-3, warmup_steps=10_000, weight_decay=0.01,
                   grad_clip=1.0, ema_decay=0.9999, ema_warmup=False)
    c.train.update(num_steps=150_000, log_every=100, checkpoint_every=10_000,
                   preview_every=10_000, preview_num=64, preview_sampler="ddpm",
                   preview_steps="250")
    c.sample.update(num=50_000, batch_size=256, sampler="ddpm", steps="1000")
  elif "tiny" in presets:
    preset_lib.apply_tiny(c)
    c.sample.steps = c.train.preview_steps = "10"
  else:
    d.num_timesteps = 100
    c.sample.update(sampler="ddpm", steps="100")

  preset_lib.apply_shorthands(c, kv, __file__)
  return config_lib.finalize(c)
