"""AutoAWQ 0.2.9 on layer 0 of a Qwen2 checkpoint only, instrumented (the diagnosis of its CPU failure).

[AWQ_FIX=1] python dev/qwen2q_dev/research/peers/autoawq_layer0.py MODEL_DIR float32|float16|bfloat16 [N_SAMPLES 8] [SEQ_LEN 512]
AWQ_FIX=1 clones the weight backup of AutoAWQ's scale search (what compare-peers' autoawq row does).
Calibration: the first N_SAMPLES * SEQ_LEN tokens of compare_peers' default calibration text.
Prints: the layer kwargs AutoAWQ caches (mask, rope), per scaling group the chosen ratio, loss history,
overflow counts and scale range; then layer-0 output error (fp32, correct rope 1e6, causal) of
  rtn      round-to-nearest int4 g128 of the original weights
  awq      AutoAWQ's scaled+clipped layer (in DTYPE), quantized as AutoAWQ does (fp16 Q)
  awq-f32q the same scales/clips re-applied to fp32 weights and quantized in fp32
"""
import copy, json, sys, time, math
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))  # dev/, where qwen2q_dev lives (not the repo root)
import torch, transformers
from safetensors import safe_open
import awq.quantize.quantizer as qz
from awq import AutoAWQForCausalLM
from qwen2q.tokenizer import Tokenizer
from qwen2q_dev.research.compare_peers import calibration_blocks, default_calib

src, dtype = sys.argv[1], getattr(torch, sys.argv[2])
n, L = (int(sys.argv[3]) if len(sys.argv) > 3 else 8), (int(sys.argv[4]) if len(sys.argv) > 4 else 512)
torch.manual_seed(0)
print("transformers", transformers.__version__, "dtype", dtype, "samples", n, "x", L, flush=True)
calib = calibration_blocks(default_calib(), Tokenizer(src), n, L)

awq_model = AutoAWQForCausalLM.from_pretrained(src, torch_dtype=dtype, device_map="cpu")
model = awq_model.model
cfg = model.config
print("config rope_theta seen by transformers:", getattr(cfg, "rope_theta", None), getattr(cfg, "rope_parameters", None),
      "attn impl:", cfg._attn_implementation, flush=True)

# fp32 original layer 0 straight from the file
f = safe_open(f"{src}/model.safetensors", "pt")
layer_cls = type(model.model.layers[0])
ref_layer = copy.deepcopy(model.model.layers[0]).float()
ref_layer.load_state_dict({k[len("model.layers.0."):]: f.get_tensor(k).float() for k in f.keys()
                           if k.startswith("model.layers.0.")})
emb = f.get_tensor("model.embed_tokens.weight").float()
x0 = emb[calib]  # [n, L, H] fp32 input of layer 0
hd = cfg.hidden_size // cfg.num_attention_heads
inv = 1.0 / (1e6 ** (torch.arange(0, hd, 2).float() / hd))
fr = torch.arange(L).float()[:, None] * inv[None]
e = torch.cat([fr, fr], -1)
cos_ok, sin_ok = e.cos()[None], e.sin()[None]

# instrumentation
log = {"groups": [], "forward": []}
orig_search, orig_loss, orig_fwd = qz.AwqQuantizer._search_best_scale, qz.AwqQuantizer._compute_loss, qz.AwqQuantizer._module_forward
def search(self, module, prev_op, layers, inp, module2inspect=None, kwargs={}):
    names = [qz.get_op_name(module, m) for m in layers]
    g = {"layers": names, "losses": [], "inp_absmax": inp.abs().max().item(), "inp_dtype": str(inp.dtype)}
    if module2inspect is not None and kwargs:
        sk = self._sanitize_kwargs(kwargs, module2inspect)
        g["kwargs_to_inspected"] = {k: (type(v).__name__ if not isinstance(v, torch.Tensor) else f"tensor{tuple(v.shape)} {v.dtype}")
                                    if not isinstance(v, tuple) else [f"tensor{tuple(t.shape)} {t.dtype}" for t in v] for k, v in sk.items()}
    log["groups"].append(g)
    out = orig_search(self, module, prev_op, layers, inp, module2inspect, kwargs)
    s = out[2].float()
    g.update(scale_min=s.min().item(), scale_max=s.max().item())
    return out
def loss(self, a, b, device):
    l = orig_loss(self, a, b, device)
    log["groups"][-1]["losses"].append(l)
    return l
def fwd(self, x, module, kw):
    y = orig_fwd(self, x, module, kw)
    log["forward"].append((type(module).__name__, str(y.dtype), y.float().abs().max().item(), int(torch.isinf(y).sum()), int(torch.isnan(y).sum())))
    return y
qz.AwqQuantizer._search_best_scale, qz.AwqQuantizer._compute_loss, qz.AwqQuantizer._module_forward = search, loss, fwd
rec = {}
import os
FIX = os.environ.get("AWQ_FIX") == "1"
if FIX:  # back up the inspected module's weights with copies: on CPU `v.cpu()` returns the live tensor itself
    orig_cbs = qz.AwqQuantizer._compute_best_scale
    def cbs(self, x, w_mean, x_mean, module2inspect, *a, **k):
        live = module2inspect.state_dict
        module2inspect.state_dict = lambda *aa, **kk: {n: t.clone() for n, t in live(*aa, **kk).items()}
        try:
            return orig_cbs(self, x, w_mean, x_mean, module2inspect, *a, **k)
        finally:
            del module2inspect.state_dict
    qz.AwqQuantizer._compute_best_scale = cbs
print("AWQ_FIX (clone the weight backup):", FIX, flush=True)
orig_apply_scale, orig_apply_clip = qz.apply_scale, qz.apply_clip
def apply_scale(module, scales_list, input_feat_dict=None):
    rec["scales"] = [(p, l, s.clone().float()) for p, l, s in scales_list]
    return orig_apply_scale(module, scales_list, input_feat_dict)
def apply_clip(module, clip_list):
    rec["clips"] = [(nm, m.clone().float()) for nm, m in clip_list]
    return orig_apply_clip(module, clip_list)
qz.apply_scale, qz.apply_clip = apply_scale, apply_clip

t0 = time.process_time()
q = qz.AwqQuantizer(awq_model, model, None, 4, 128, True, "gemm", calib.tolist(), "train", "text", True,
                    export_compatible=True, max_calib_samples=n, max_calib_seq_len=L)
kw = q.module_kwargs
desc = {}
for k, v in kw.items():
    if isinstance(v, torch.Tensor): desc[k] = f"tensor{tuple(v.shape)} {v.dtype}"
    elif isinstance(v, tuple): desc[k] = [f"tensor{tuple(t.shape)} {t.dtype}" for t in v]
    else: desc[k] = repr(v)[:80]
print("cached layer kwargs:", json.dumps(desc), flush=True)
print("inps", tuple(q.inps.shape), q.inps.dtype, "max|x0 - inps|", (q.inps.float() - x0).abs().max().item(), flush=True)
q.modules = q.modules[:1]
q.quantize()
pe = q.module_kwargs["position_embeddings"]
cos_c = pe[0].float()
cos_1e4 = torch.cat([torch.arange(L).float()[:, None] / (1e4 ** (torch.arange(0, hd, 2).float() / hd))[None]] * 2, -1).cos()
print("cached cos vs theta 1e6: max err", (cos_c[0] - cos_ok[0]).abs().max().item(),
      "vs theta 1e4:", (cos_c[0] - cos_1e4).abs().max().item(), flush=True)
print("attention_mask passed:", None if q.module_kwargs.get("attention_mask") is None else tuple(q.module_kwargs["attention_mask"].shape))
print(f"layer-0 AWQ CPU s {time.process_time() - t0:.1f}", flush=True)
for g in log["groups"]:
    ls = g.pop("losses")
    best = min(range(len(ls)), key=ls.__getitem__)
    print(json.dumps({**g, "best_ratio": best / 20, "loss@0": ls[0], "loss_best": ls[best], "loss@0.5": ls[10],
                      "n_inf_loss": sum(not math.isfinite(v) for v in ls)}), flush=True)
bad = [r for r in log["forward"] if r[3] or r[4]]
print("forwards:", len(log["forward"]), "with inf/nan:", len(bad), bad[:3], "max|y|:", max(r[2] for r in log["forward"]), flush=True)

def pq(w, fp16):
    w = w.half() if fp16 else w.float()
    return q.pseudo_quantize_tensor(w)[0].float()

def run(layer):
    with torch.no_grad():
        y = layer(x0, attention_mask=None, position_ids=torch.arange(L)[None], position_embeddings=(cos_ok, sin_ok))
    return y[0] if isinstance(y, tuple) else y

LIN = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]
def quantized(layer, fp16):
    layer = copy.deepcopy(layer).float()
    for nm in LIN:
        lin = layer.get_submodule(nm)
        lin.weight.data = pq(lin.weight.data, fp16)
    return layer

y = run(ref_layer)
def err(layer):
    d = run(layer) - y
    delta_ref = y - x0  # the layer's own contribution (output minus residual input)
    return f"rel err of output {d.norm() / y.norm():.4f}, of layer contribution {d.norm() / delta_ref.norm():.4f}"

print("rtn fp32      :", err(quantized(ref_layer, False)))
awq_layer = model.model.layers[0]
print("awq (as-is, Q in fp16):", err(quantized(awq_layer, True)))
print("awq (as-is, Q in fp32):", err(quantized(awq_layer, False)))
print("awq scaled, unquantized (folding check):", err(copy.deepcopy(awq_layer).float()))
# the same scales and clips re-applied in fp32
l32 = copy.deepcopy(ref_layer)
orig_apply_scale(l32, [(p, l, s) for p, l, s in rec["scales"]])
if "clips" in rec:
    orig_apply_clip(l32, rec["clips"])
print("scales/clips found in", dtype, "applied in fp32, Q fp32:", err(quantized(l32, False)))
l32s = copy.deepcopy(ref_layer)
orig_apply_scale(l32s, [(p, l, s) for p, l, s in rec["scales"]])
print("  same, scales only (no clip):", err(quantized(l32s, False)))
