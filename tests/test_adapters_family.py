"""The adapter family's shared interface: every member registered once, one PEM type per merge, honest repr()."""

import json
from dataclasses import dataclass
from dataclasses import field as dataclass_field

import pytest
import torch
from safetensors.torch import load_file, save_file

from extsub_kernels import (
    AdapterOptions,
    IA3Adapter,
    InputError,
    LoraAdapter,
    LoraModule,
    PeftAdapter,
    PrefixAdapter,
    _names,
    ext_sub_reference,
    merge,
    merge_adapters,
)
from extsub_kernels.adapters import owns_adapter_key
from extsub_kernels.adapters import peft as peft_module
from extsub_kernels.adapters.family import OutputFormat, adapter_folder, lam_list, peft_fields
from extsub_kernels.adapters.peft import FORMATS, MEMBERS, load_adapter, member_for, output_formats
from extsub_kernels.engine.methods import apply_method
from extsub_kernels.io import TensorEntry, resolve_input
from extsub_kernels.lambda_scan.installers import installer_for


def _members(size: int = 4) -> dict[type, PeftAdapter]:
    """One adapter of each type, in memory, `size` wide."""
    return {
        LoraAdapter: LoraAdapter({"q": LoraModule(torch.randn(2, size), torch.randn(size, 2), 1.0)}, source="lora/"),
        IA3Adapter: IA3Adapter({"k": 1 + torch.randn(size, 1)}, source="ia3/"),
        PrefixAdapter: PrefixAdapter(torch.randn(2, 2 * 2 * size), 2, 2, size, 2, source="prefix/"),
    }


def test_every_format_belongs_to_one_member_and_has_a_writer():
    owned = [f.name for member in MEMBERS for f in member.formats]
    assert sorted(owned) == sorted(FORMATS) == sorted(output_formats()), "one vocabulary, one writer per format"
    assert _names.FORMATS == FORMATS, "the torch-free --format choices are the members' formats, in their order"
    assert len(set(owned)) == len(owned), "no format is shared by two PEM types"
    assert {member.peft_type for member in MEMBERS} == {"LORA", "IA3", "PREFIX_TUNING"}


def test_each_type_takes_its_own_formats_and_options():
    assert [AdapterOptions().format_for(member, base=False) for member in MEMBERS] == ["lora", "ia3", "prefix-tuning"]
    with pytest.raises(InputError, match=r"format=ia3 does not apply to LoRA adapters; their formats: lora \(the "):
        AdapterOptions(output_format="ia3").format_for(LoraAdapter, base=False)
    with pytest.raises(InputError, match=r"max_rank= truncates LoRA factors; \(IA\)³ adapters have no rank"):
        AdapterOptions(max_rank=4).format_for(IA3Adapter, base=False)
    with pytest.raises(InputError, match="base= with prefix-tuning adapters: a prefix adds virtual key/value tokens"):
        AdapterOptions().format_for(PrefixAdapter, base=True)
    assert AdapterOptions().format_for(IA3Adapter, base=True) == "ia3"  # folds into the base model


def test_keys_are_recognised_by_their_owner_only():
    keys = {
        LoraAdapter: "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight",
        IA3Adapter: "base_model.model.model.layers.0.self_attn.k_proj.ia3_l",
        PrefixAdapter: "prompt_embeddings",
    }
    for member in MEMBERS:
        assert [m for m in MEMBERS if m.owns_key(keys[member])] == [member]
    assert not any(m.owns_key("base_model.model.lm_head.weight") for m in MEMBERS)


def test_repr_shows_shapes_and_counts_never_tensors():
    for member, adapter in _members(4096).items():
        text = repr(adapter)
        assert text.startswith(f"{member.__name__}(") and "tensor(" not in text and len(text) < 300, text
        assert f"source='{adapter.source}'" in text
    members = _members()
    assert "1 module, rank 2, float32" in repr(members[LoraAdapter])
    assert repr(members[LoraAdapter].modules["q"]) == "LoraModule(out=4, in=4, rank=2, scaling=1, dtype=float32)"
    assert "1 vector: 1 (out, 1), 0 feedforward (1, in), 4 scales, float32" in repr(members[IA3Adapter])
    assert "2 virtual tokens × 2 layers × 2 (key, value) × 2 heads × 2" in repr(members[PrefixAdapter])
    merged = merge_adapters(members[IA3Adapter], members[IA3Adapter], 1.0)
    assert "report: ext-sub λ=1: 1 (IA)³ vector: 1 merged" in repr(merged)


def test_adapters_of_different_types_are_refused_naming_both():
    members = _members()
    for expert in MEMBERS:
        for anti in MEMBERS:
            if expert is anti:
                continue
            with pytest.raises(InputError) as caught:
                merge_adapters(members[expert], members[anti], 1.0)
            message = str(caught.value)
            assert f"{members[anti].source} is a {anti.label} adapter" in message, message
            assert f"the expert {members[expert].source} is a {expert.label} adapter" in message, message


def test_shared_rules():
    assert lam_list(0.5, 3) == (0.5, 0.5, 0.5) and lam_list([1, 2], 2) == (1.0, 2.0)
    with pytest.raises(InputError, match="got 2 λ values for 3 anti-experts"):
        lam_list([1, 2], 3)
    ia3 = _members()[IA3Adapter]
    other = IA3Adapter({"k": 1 + torch.randn(4, 1)}, source="other/", base_model_name_or_path="org/b")
    ia3.base_model_name_or_path = "org/a"
    with pytest.raises(InputError, match=r"other/ was trained on base model 'org/b' but the expert ia3/ on 'org/a'"):
        merge_adapters(ia3, other, 1.0)
    assert merge_adapters(ia3, other, 1.0, any_base_model=True).base_model_name_or_path == "org/a"
    with pytest.raises(InputError, match="needs at least one anti-expert"):
        merge_adapters(ia3, [], 1.0)


def test_load_adapter_names_the_supported_types(tmp_path):
    (tmp_path / "adapter_config.json").write_text('{"peft_type": "VERA"}')
    (tmp_path / "adapter_model.safetensors").write_bytes(b"")
    with pytest.raises(InputError, match="peft_type is 'VERA'; extsub merges LORA, IA3, PREFIX_TUNING adapters"):
        load_adapter(tmp_path)


# A PEM type written in this test module only: each module has one "toy" vector, a row merged as it is (no offset).
# It touches no other file: its class carries everything, and it joins the family by its entry in MEMBERS.
@dataclass(repr=False)
class ToyAdapter(PeftAdapter):
    """A toy PEM type: one vector per module, saved as `<module>.toy_v`, each one Ext-Sub row."""

    peft_type, label, tag = "TOY", "toy", "toy"
    unit, row, delta = "vector", "vector", "v⁻"
    config_needed = "nothing else"
    no_rank = "toy vectors have"

    vectors: dict[str, torch.Tensor] = dataclass_field(default_factory=dict)
    report: object = None

    @staticmethod
    def write(adapter: "ToyAdapter", *, dtype: torch.dtype | None = None, device: object = None) -> object:
        makers = [
            (TensorEntry(f"{k}.toy_v", dtype or v.dtype, tuple(v.shape)), lambda v=v: v.to(dtype or v.dtype))
            for k, v in adapter.vectors.items()
        ]
        return adapter_folder(makers, adapter, {"peft_type": "TOY"})

    @classmethod
    def from_peft(cls, weights, tensors, config, where):
        vectors = {k.removesuffix(".toy_v"): t for k, t in tensors.items() if k.endswith(".toy_v")}
        return cls(vectors=vectors, **peft_fields(weights, config, {}))

    @classmethod
    def owns_key(cls, key):
        return key.endswith(".toy_v")

    def merge_units(self, step):
        vectors = {}
        for name, vector in self.vectors.items():
            work = vector.double().reshape(1, -1)
            for anti, lam in zip(step.antis, step.lams, strict=True):
                apply_method(work, [anti.vectors[name].double().reshape(1, -1)], [lam], method=step.spec, inplace=True)
            step.report.merged.append(name)
            vectors[name] = work.reshape(vector.shape).to(vector.dtype)
        return {"vectors": vectors}

    def check_antis(self, antis):
        pass

    def stat_units(self):
        return {name: v.double().reshape(1, -1) for name, v in self.vectors.items()}

    def unit_shapes(self):
        return {name: (tuple(v.shape), "F32") for name, v in self.vectors.items()}

    def describe(self):
        return f"{len(self.vectors)} toy vectors"


ToyAdapter.formats = (OutputFormat("toy", ToyAdapter.write, lambda unit: (f"{unit}.toy_v",), "a toy adapter"),)


def test_a_new_pem_type_is_one_class_and_one_members_entry(tmp_path, monkeypatch):
    """Detected, loaded, merged, reported on and written through the shared mechanism; every registry follows."""
    monkeypatch.setattr(peft_module, "MEMBERS", (*peft_module.MEMBERS, ToyAdapter))
    assert "toy" in output_formats() and member_for("TOY") is ToyAdapter and owns_adapter_key("m.toy_v")
    assert installer_for(ToyAdapter) is None  # a type the scan cannot install says so
    rows = {"expert": torch.tensor([[3.0, 4.0]]), "anti": torch.tensor([[1.0, 0.0]])}
    for role, vector in rows.items():
        (tmp_path / role).mkdir()
        (tmp_path / role / "adapter_config.json").write_text('{"peft_type": "TOY"}')
        save_file({"layers.0.k.toy_v": vector}, str(tmp_path / role / "adapter_model.safetensors"))
    bare = resolve_input(tmp_path / "expert" / "adapter_model.safetensors", adapter_key=owns_adapter_key)
    assert bare.adapter, "its keys make a bare file an adapter"
    report = merge(tmp_path / "expert", tmp_path / "anti", tmp_path / "out", lam=2.0, adapter=AdapterOptions())
    written = load_file(str(tmp_path / "out" / "adapter_model.safetensors"))["layers.0.k.toy_v"]
    expected = ext_sub_reference(rows["expert"], rows["anti"], 2.0)
    torch.testing.assert_close(written, expected.to(written.dtype))  # float64 rounded once to float32
    assert json.loads((tmp_path / "out" / "adapter_config.json").read_text()) == {"peft_type": "TOY"}
    assert "1 toy vector: 1 merged" in report.summary()
    assert "toy" in (tmp_path / "out" / "README.md").read_text()  # its card tag
    with pytest.raises(InputError, match="format=lora does not apply to toy adapters; their formats: toy"):
        merge(tmp_path / "expert", tmp_path / "anti", tmp_path / "o2", adapter=AdapterOptions(output_format="lora"))
