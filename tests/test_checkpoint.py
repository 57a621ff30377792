"""Checkpoint directories: sharded loading, and a one-line error for every broken input."""
import json
import os

import pytest
import torch

from conftest import make_hf_checkpoint
from qwen2q.errors import Qwen2qError
from qwen2q.checkpoint import (OWN_MAP_BYTES, WRITE_CHUNK_BYTES, TensorIndex, iter_tensors, save_safetensors,
                               weight_files)
from qwen2q.loader import load_model, save_model


def test_sharded_checkpoint_equals_single_file(tmp_path):
    make_hf_checkpoint(tmp_path / "one", seed=4, tie_word_embeddings=False)
    make_hf_checkpoint(tmp_path / "many", seed=4, tie_word_embeddings=False, shard_size="200KB")
    assert (tmp_path / "many" / "model.safetensors.index.json").is_file()
    assert len(list((tmp_path / "many").glob("model-*.safetensors"))) > 2
    a, b = load_model(tmp_path / "one"), load_model(tmp_path / "many")
    for (na, pa), (nb, pb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert na == nb and torch.equal(pa, pb)


def test_loaded_tensors_keep_checkpoint_dtype_by_default(tmp_path):
    make_hf_checkpoint(tmp_path, dtype=torch.bfloat16)
    model = load_model(tmp_path)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert not any(p.is_meta for p in model.parameters())


def test_save_model_round_trips(hf_tiny, tmp_path):
    path, _ = hf_tiny
    model = load_model(path)
    save_model(model, tmp_path / "copy")
    again = load_model(tmp_path / "copy")
    ids = torch.arange(50).view(1, 50)
    with torch.no_grad():
        assert torch.equal(model(ids), again(ids))


def _error(path, **kw) -> str:
    with pytest.raises(Qwen2qError) as e:
        load_model(path, **kw)
    message = str(e.value)
    assert "\n" not in message
    return message


def test_missing_directory(tmp_path):
    assert "no such directory" in _error(tmp_path / "absent")


def test_non_qwen2_model_type(hf_tiny):
    path, _ = hf_tiny
    cfg = json.loads((path / "config.json").read_text())
    cfg["model_type"] = "llama"
    (path / "config.json").write_text(json.dumps(cfg))
    assert "model_type='llama'" in _error(path)


def test_missing_shard(tmp_path):
    make_hf_checkpoint(tmp_path, shard_size="200KB")
    victim = sorted(tmp_path.glob("model-*.safetensors"))[1]
    victim.unlink()
    assert victim.name in _error(tmp_path)


def test_truncated_safetensors(hf_tiny):
    path, _ = hf_tiny
    f = path / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-1000])
    assert "truncated or corrupt" in _error(path)


def test_pickle_refused_unless_allowed(hf_tiny):
    path, hf = hf_tiny
    (path / "model.safetensors").unlink()
    torch.save(hf.state_dict(), path / "pytorch_model.bin")
    assert "allow_pickle" in _error(path)
    model = load_model(path, allow_pickle=True, dtype="float32")
    ids = torch.arange(20).view(1, 20)
    with torch.no_grad():
        assert (model(ids) - hf(ids).logits).abs().max() <= 1e-4


def test_checkpoint_missing_a_tensor(hf_tiny):
    from safetensors.torch import load_file, save_file

    path, _ = hf_tiny
    state = load_file(path / "model.safetensors")
    del state["model.layers.1.mlp.up_proj.weight"]
    save_file(state, path / "model.safetensors")
    assert "model.layers.1.mlp.up_proj.weight" in _error(path)


def test_unknown_dtype(hf_tiny):
    path, _ = hf_tiny
    assert "float64" in _error(path, dtype="float64")


def _mapped(path) -> bool:
    """Whether this process has `path` memory-mapped (Linux /proc)."""
    with open("/proc/self/maps") as maps:
        return any(str(path) in line for line in maps)


@pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="needs Linux /proc")
def test_tensor_index_release_unmaps_the_files(hf_tiny):
    path, _ = hf_tiny
    files = weight_files(path)
    index = TensorIndex(files)
    name = "model.layers.0.mlp.up_proj.weight"
    first = index.get(name).clone()
    assert _mapped(files[0])
    index.release()
    assert not _mapped(files[0])  # a layer-by-layer reader's RSS no longer holds the pages it read
    assert torch.equal(index.get(name), first)  # and reading again reopens the file


def _mapped_bytes(path) -> int:
    """Bytes of `path` this process has memory-mapped (Linux /proc)."""
    with open("/proc/self/maps") as maps:
        spans = [line.split()[0].split("-") for line in maps if line.rstrip().endswith(str(path))]
    return sum(int(end, 16) - int(start, 16) for start, end in spans)


@pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="needs Linux /proc")
def test_own_memory_tensors_map_only_their_own_bytes(tmp_path):
    path = tmp_path / "model.safetensors"
    rows = OWN_MAP_BYTES // 2 // 64 + 1  # bf16 [rows, 64]: just over OWN_MAP_BYTES, so mapped on its own
    stored = {"a.bias": torch.arange(5, dtype=torch.float32),  # 20 bytes first: bf16 data not page-aligned
              "b.weight": torch.randn(rows, 64).to(torch.bfloat16),
              "c.weight": torch.randn(rows, 64).to(torch.bfloat16)}
    save_safetensors(stored, path)
    own = dict(iter_tensors([path], own_memory=True))
    assert list(own) == [name for name, _ in iter_tensors([path])]  # the same order as the shared map's
    for name, t in stored.items():
        assert own[name].dtype == t.dtype and torch.equal(own[name], t)
    kept = own.pop("c.weight")
    del own  # the reader drops the rest: their pages are unmapped at once, the kept tensor maps only its own
    assert 0 < _mapped_bytes(path) < kept.nbytes + 2 * 65536
    kept[0, 0] = 7.0  # copy-on-write: the checkpoint file is not changed
    assert torch.equal(next(t for name, t in iter_tensors([path]) if name == "c.weight"), stored["c.weight"])
    del kept
    assert not _mapped(path)


def test_own_memory_copies_pickle_tensors(tmp_path):
    path = tmp_path / "pytorch_model.bin"
    torch.save({"w": torch.ones(2, 3)}, path)
    (name, shared), = iter_tensors([path])
    (_, own), = iter_tensors([path], own_memory=True)
    assert torch.equal(own, shared) and own.untyped_storage().data_ptr() != shared.untyped_storage().data_ptr()


@pytest.mark.parametrize("seed", range(3))
def test_save_safetensors_writes_the_bytes_safetensors_writes(tmp_path, seed):
    from safetensors.torch import save

    g = torch.Generator().manual_seed(seed)
    dtypes = [torch.int64, torch.float64, torch.float32, torch.int32, torch.bfloat16, torch.float16, torch.int16,
              torch.int8, torch.uint8, torch.bool]
    shapes = [(), (0,), (3,), (2, 5), (1, 1, 7)]
    names = ["a", "b.weight", "model.layers.10.x", "model.layers.9.x", "Z", "\u00fcn\u00efcode", 'q"uote\\ \n\x01',
             "lm_head.weight", "model.layers.0.mlp.up_proj.SCB", "w"]
    state = {name: (torch.randn(shapes[(i + seed) % len(shapes)], generator=g) * 100).to(dtypes[(3 * i + seed) % 10])
             for i, name in enumerate(names)}
    state["big"] = torch.randn(WRITE_CHUNK_BYTES // 4 + 3, generator=g)  # written in more than one piece
    state["transposed"] = torch.randn(3, 4, generator=g).t()  # made contiguous first
    path = tmp_path / "x.safetensors"
    save_safetensors(state, path)
    assert path.read_bytes() == save({k: v.contiguous() for k, v in state.items()}, metadata={"format": "pt"})


def test_save_safetensors_still_refuses_tensors_sharing_memory(tmp_path):
    x = torch.zeros(3)
    with pytest.raises(RuntimeError, match="share memory"):
        save_safetensors({"a": x, "b": x}, tmp_path / "x.safetensors")


def test_written_shards_get_the_usual_file_mode(tmp_path):
    path = tmp_path / "x.safetensors"
    save_safetensors({"a": torch.zeros(3)}, path)
    mask = os.umask(0)
    os.umask(mask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~mask  # not safetensors' own 0600
