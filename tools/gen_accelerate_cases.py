#!/usr/bin/env python3
"""Generate tests/fixtures/accelerate/*.json and tests/fixtures/module_trees/<ID>.json.

Runs the REAL accelerate functions (``accelerate.utils.modeling``) on the torch fixture
models of accelerate-cases.md (tools/fixture_models.py) and records their outputs, so the
C++ conformance tests compare against accelerate itself. Run with PYTHONHASHSEED=0 (as
tools/regen_fixtures.sh does): accelerate's cleaned device maps and tied groups are ordered
by set iteration, which depends on the hash seed.

JSON conventions: every file is a list of case objects, each with "id" and "function";
``max_memory``-like dicts and device maps are lists of ``[key, value]`` pairs (so int GPU
keys stay ints and order is kept); exceptions are ``{"type": ..., "message": ...}``.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import math
import os
import sys
import warnings
from typing import Any, Callable

import torch
from accelerate.utils import modeling as am

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from dump_module_tree import dtype_name, module_tree  # noqa: E402
from fixture_models import MODELS, no_split_for  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "tests", "fixtures", "accelerate")
TREES = os.path.join(ROOT, "tests", "fixtures", "module_trees")


# --------------------------------------------------------------------------- capture helpers


class _ListHandler(logging.Handler):
    def __init__(self):
        super().__init__(level=logging.DEBUG)
        self.records: list[dict[str, str]] = []

    def emit(self, record):
        self.records.append({"level": record.levelname, "message": record.getMessage()})


# get_max_memory warns "Device k is not available" for every int key on this GPU-less machine;
# that line is recorded in max_memory.json only and filtered from the other files.
NO_GPU_LOG = "is not available, available devices are"


def run_captured(fn: Callable[[], Any], keep_device_logs: bool = False) -> dict[str, Any]:
    """Call ``fn`` capturing stdout lines, accelerate log records, warnings and exceptions."""
    handler = _ListHandler()
    logger = logging.getLogger("accelerate")
    old_level, old_propagate = logger.level, logger.propagate
    logger.setLevel(logging.DEBUG)
    logger.propagate = False
    logger.addHandler(handler)
    out = io.StringIO()
    result: dict[str, Any] = {}
    try:
        with warnings.catch_warnings(record=True) as caught, contextlib.redirect_stdout(out):
            warnings.simplefilter("always")
            try:
                result["value"] = fn()
            except Exception as exc:  # noqa: BLE001 - we record what accelerate raises
                result["raises"] = {"type": type(exc).__name__, "message": str(exc)}
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)
        logger.propagate = old_propagate
    result["stdout"] = out.getvalue().splitlines()
    result["logs"] = [
        r for r in handler.records if keep_device_logs or NO_GPU_LOG not in r["message"]
    ]
    result["warnings"] = [{"category": w.category.__name__, "message": str(w.message)} for w in caught]
    return result


def jkey(k: Any) -> Any:
    """A JSON-safe device / key (ints stay ints, torch.device becomes its string)."""
    if isinstance(k, torch.device):
        return str(k)
    return k


def jnum(v: Any) -> Any:
    """Keep ints as ints and floats as floats (no conversion), reject non-finite floats."""
    if isinstance(v, bool) or isinstance(v, int):
        return v
    if isinstance(v, float):
        if not math.isfinite(v):
            return str(v)
        return v
    return v


def pairs(d: dict) -> list[list[Any]]:
    """Dict → list of [key, value] pairs in iteration order."""
    return [[jkey(k), jnum(v) if not isinstance(v, (str, torch.device)) else jkey(v)] for k, v in d.items()]


def build(tree_id: str) -> torch.nn.Module:
    """Fresh instance of a fixture model."""
    return MODELS[tree_id]()


def torch_dtype(name: str | None):
    return None if name is None else getattr(torch, name.replace("torch.", ""))


def write(name: str, data: Any) -> None:
    """Write a fixture file (compact one-case-per-line JSON, deterministic)."""
    path = os.path.join(OUT, name)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as fh:
        if isinstance(data, list):
            fh.write("[\n")
            fh.write(",\n".join(json.dumps(c, separators=(",", ":"), allow_nan=False, ensure_ascii=False) for c in data))
            fh.write("\n]\n")
        else:
            json.dump(data, fh, indent=1, allow_nan=False)
            fh.write("\n")
    print(f"wrote {os.path.relpath(path, ROOT)}: {len(data)} entries")


# --------------------------------------------------------------------------- module trees


def gen_trees() -> None:
    os.makedirs(TREES, exist_ok=True)
    for tree_id in MODELS:
        with open(os.path.join(TREES, f"{tree_id}.json"), "w", encoding="utf-8") as fh:
            json.dump(module_tree(build(tree_id)), fh, separators=(",", ":"))
            fh.write("\n")
    print(f"wrote {len(MODELS)} module trees")


# --------------------------------------------------------------------------- B: dtype sizes


def gen_dtype_sizes() -> list:
    names = sorted({dtype_name(v) for v in vars(torch).values() if isinstance(v, torch.dtype)})
    cases = []
    for n in names:
        dt = getattr(torch, n)
        r = run_captured(lambda: am.dtype_byte_size(dt))
        case = {"id": f"B_{n}", "function": "dtype_byte_size", "dtype": n}
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                case["torch_itemsize"] = torch.empty(0, dtype=dt).element_size()
        except Exception:  # noqa: BLE001
            case["torch_itemsize"] = None
        if "raises" in r:
            case["raises"] = r["raises"]
        else:
            case["size"] = r["value"]
        cases.append(case)
    for cname in ("INT2", "INT4", "FP8"):
        cd = getattr(am.CustomDtype, cname)
        cases.append(
            {"id": f"B_custom_{cname}", "function": "dtype_byte_size", "dtype": f"CustomDtype.{cname}",
             "size": am.dtype_byte_size(cd), "torch_itemsize": None}
        )
    return cases


# --------------------------------------------------------------------------- C: size strings

SIZE_INPUTS: list[Any] = [
    "0MB", "100MB", "2GiB", "512KiB", "1.5GB", "100KB", 500, "5MBB", "5k0MB", "-1GB",
    "1GB", "1Gb", "1gb", "1mb", "1Mb", "8Kb", "1.5Kb", "1.5MiB", "10GIB", "1KIB", "1 GB", "1 GiB",
    "1GiB ", "1TB", "1000", "1B", "7b", "0.1KB", "3.7GB", "4.35MB", "2.675GiB", "1e3KB", "1e-3GB",
    ".5GB", "5.GB", "+1GB", "1_000MB", "0x10MB", "inf GB", 1.5, -5, True,
    # extra edge cases
    " 1GB", "1GB ", "\t2MB", "1gib", "1mib", "1kib", "1GiB\n", "1e10GB", "1E3MB", "-0GB", "-0.5GB",
    "0.4b", "0.9KB", "1.999Kb", "nan GB", "NaN MiB", "infGB", "-inf GB", "1__000MB", "_1MB", "1_MB",
    "", "GB", "MB", "KiB", "1 G B", "１GB", "0", 0, 2**40, "12345678901234567890GB", "1.0000000001GB",
    "7Kb", "9Mb", "1kB", "1Kb", "1KB", "1kb", "1mB", "2gB", "3GIb", "3GiB", "1.5e3KiB",
    "1e-9GB", "5e-324GB", None, [1], 3.0, False,
]


def gen_size_strings() -> list:
    cases = []
    for i, inp in enumerate(SIZE_INPUTS):
        r = run_captured(lambda: am.convert_file_size_to_int(inp))
        case = {"id": f"C_{i + 1}", "function": "convert_file_size_to_int", "input": inp,
                "input_type": type(inp).__name__}
        if "raises" in r:
            case["raises"] = r["raises"]["type"]
            case["message"] = r["raises"]["message"]
        else:
            case["expected"] = r["value"]
        cases.append(case)
    return cases


# --------------------------------------------------------------------------- D: module sizes


def sizes_case(case_id, tree, dtype=None, special=None, buffers_only=False) -> dict:
    model = build(tree)
    r = run_captured(
        lambda: am.compute_module_sizes(model, dtype=dtype, special_dtypes=special, buffers_only=buffers_only)
    )
    case = {"id": case_id, "function": "compute_module_sizes", "tree": tree,
            "dtype": None if dtype is None else str(dtype).replace("torch.", "") if not isinstance(dtype, str)
            else dtype,
            "special_dtypes": None if special is None else {k: (v if isinstance(v, str) else dtype_name(v))
                                                               for k, v in special.items()},
            "buffers_only": buffers_only}
    if "raises" in r:
        case["raises"] = r["raises"]
    else:
        d = dict(r["value"])
        case["expected"] = {k: jnum(v) for k, v in d.items()}
        case["expected_order"] = list(d.keys())
    return case


def gen_module_sizes() -> list:
    c = [
        sizes_case("D1", "F1"),
        sizes_case("D2", "F1_half"),
        sizes_case("D3", "F1", torch.float16),
        sizes_case("D4", "F1", "torch.float16"),
        sizes_case("D5", "F1", torch.float64),
        sizes_case("D6", "F1", torch.int8),
        sizes_case("D7", "F1", special={"linear1.weight": torch.float16}),
        sizes_case("D8", "F1", torch.float16, {"linear2.weight": "float32"}),
        sizes_case("D9", "D9"),
        sizes_case("D10", "D10"),
        sizes_case("D11", "D11"),
    ]
    for cid, tree in (("D12", "D12"), ("D13", "D13")):
        model = build(tree)
        c.append({"id": cid, "function": "compute_module_total_buffer_size", "tree": tree, "dtype": None,
                  "special_dtypes": None, "buffers_only": True,
                  "expected": jnum(am.compute_module_total_buffer_size(model))})
    c.append(sizes_case("D14", "F17"))
    c.append(sizes_case("D15_bad_dtype", "F1", "float17"))
    for tree in MODELS:
        for dt in (None, "float16", "bfloat16", "int8"):
            c.append(sizes_case(f"Dgen_{tree}_{dt}", tree, dt))
        c.append(sizes_case(f"Dgen_{tree}_buffers", tree, None, buffers_only=True))
        model = build(tree)
        for dt in (None, "float16"):
            c.append({"id": f"Dgen_{tree}_total_buffer_{dt}", "function": "compute_module_total_buffer_size",
                      "tree": tree, "dtype": dt, "special_dtypes": None, "buffers_only": True,
                      "expected": jnum(am.compute_module_total_buffer_size(model, dtype=dt))})
    return c


# --------------------------------------------------------------------------- E: max layer size


def root_queue(model):
    return (
        list(model.named_parameters(recurse=False))
        + list(model.named_children())
        + list(model.named_buffers(recurse=False))
    )


def layer_case(case_id, tree, modules, ns) -> dict:
    model = build(tree)
    sizes = am.compute_module_sizes(model)
    queue = list(model.named_children()) if modules == "children" else root_queue(model)
    r = run_captured(lambda: am.get_max_layer_size(queue, sizes, ns))
    case = {"id": case_id, "function": "get_max_layer_size", "tree": tree, "modules": modules, "no_split": ns}
    if "raises" in r:
        case["raises"] = r["raises"]
    else:
        case["expected_size"] = jnum(r["value"][0])
        case["expected_names"] = r["value"][1]
    return case


def gen_max_layer() -> list:
    c = [
        layer_case("E1", "F1", "children", []),
        layer_case("E2", "Seq2F1", "children", []),
        layer_case("E3", "Seq2F1", "children", ["ModelForTest"]),
        layer_case("E4", "F15", "root_queue", []),
    ]
    total, (ms, names) = am.calculate_maximum_sizes(build("F15"))
    c.append({"id": "E5", "function": "calculate_maximum_sizes", "tree": "F15", "modules": "root_queue",
              "no_split": [], "expected_total": jnum(total), "expected_size": jnum(ms), "expected_names": names})
    c.append(layer_case("E6", "F17", "root_queue", ["Block"]))
    c.append(layer_case("E7", "F17", "children", []))
    for tree in MODELS:
        for modules in ("children", "root_queue"):
            for ns in ([], no_split_for(tree)):
                c.append(layer_case(f"Egen_{tree}_{modules}_{'ns' if ns else 'nons'}", tree, modules, ns))
        total, (ms, names) = am.calculate_maximum_sizes(build(tree))
        c.append({"id": f"Egen_{tree}_calculate_maximum_sizes", "function": "calculate_maximum_sizes",
                  "tree": tree, "modules": "root_queue", "no_split": [], "expected_total": jnum(total),
                  "expected_size": jnum(ms), "expected_names": names})
    return c


# --------------------------------------------------------------------------- F: ties


def gen_tied() -> list:
    c = []
    named = {"F1c": "Seq4", "F2c": "Seq4_t12", "F3c": "Seq4_t124", "F4c": "Seq5_t", "F5c": "Blocks_t",
             "F6c": "F14", "F7c": "F5", "F8c": "F13", "F9c": "F4"}
    for cid, tree in named.items():
        c.append({"id": cid, "function": "find_tied_parameters", "tree": tree,
                  "expected": am.find_tied_parameters(build(tree))})
    for tree in MODELS:
        c.append({"id": f"Fgen_{tree}", "function": "find_tied_parameters", "tree": tree,
                  "expected": am.find_tied_parameters(build(tree))})
    # retie: build untied model, retie, report which names are the same object.
    retie = {"F10c": ("seq2", [["linear1.weight", "linear2.weight"]]),
             "F11c": ("seq3", [["linear1.weight", "linear2.weight", "linear3.weight"]]),
             "F12c": ("Seq5", [["linear1.weight", "linear4.weight"],
                               ["linear2.weight", "linear3.weight", "linear5.weight"]]),
             "F13c": ("Blocks", [["block1.linear1.weight", "block2.linear1.weight"]])}
    from fixture_models import seq
    from collections import OrderedDict
    builders = {"seq2": lambda: seq(2), "seq3": lambda: seq(3), "Seq5": lambda: seq(5),
                "Blocks": lambda: torch.nn.Sequential(OrderedDict([("block1", seq(4)), ("block2", seq(4))]))}
    for cid, (tree, groups) in retie.items():
        model = builders[tree]()
        am.retie_parameters(model, groups)
        c.append({"id": cid, "function": "retie_parameters", "tree": tree, "tied_params": groups,
                  "expected": module_tree(model)["tied_parameters"]})
    # F14c: accelerate's own test of get_module_size_with_ties.
    model = build("F13")
    group = am.find_tied_parameters(model)[0]
    tied_params = [p for p in group if p != "0.weight"]
    sizes = {"": 6600}
    for i in range(15):
        sizes.update({f"{i}": 440, f"{i}.weight": 400, f"{i}.bias": 40})
    queue = list(model.named_children())[1:]
    total, names, _ = am.get_module_size_with_ties(tied_params, 440, sizes, queue)
    c.append({"id": "F14c", "function": "get_module_size_with_ties", "tree": "F13", "tied_params": tied_params,
              "module_size": 440, "module_sizes": sizes, "queue": [n for n, _ in queue],
              "expected_size": total, "expected_names": names})
    # generated: first-entry view of the root queue for every tied tree, like infer_auto_device_map.
    for tree in MODELS:
        model = build(tree)
        tied = am.find_tied_parameters(model)
        if not tied:
            continue
        sizes = am.compute_module_sizes(model)
        queue = root_queue(model)
        for idx, (name, _) in enumerate(queue):
            groups = [g for g in tied if any(name + "." in k + "." for k in g)
                      and not all(name + "." in k + "." for k in g)]
            tp = sum([[p for p in g if name + "." not in p + "."] for g in groups], [])
            if not tp:
                continue
            rest = queue[idx + 1:]
            frozen = dict(sizes)
            r = run_captured(lambda: am.get_module_size_with_ties(tp, sizes[name], sizes, rest))
            case = {"id": f"Fgen_ties_{tree}_{name}", "function": "get_module_size_with_ties", "tree": tree,
                    "tied_params": tp, "module_size": jnum(frozen.get(name, 0)), "module_sizes": "tree",
                    "queue": [n for n, _ in rest]}
            if "raises" in r:
                case["raises"] = r["raises"]
                case["bug"] = "§9.2" if tree == "F14" else "§9.1"
            else:
                case["expected_size"] = jnum(r["value"][0])
                case["expected_names"] = r["value"][1]
            c.append(case)
    return c


# --------------------------------------------------------------------------- G: clean_device_map

G_CASES = {
    "G1": {"a": 0, "b": 0, "c": 0},
    "G2": {"a.x": 0, "a.y": 0, "b.x": 1, "b.y": 1, "c": 1},
    "G3": {"a.x": 0, "a.y": 0, "b.x.0": 1, "b.x.1": 1, "b.y.0": 2, "b.y.1": 2, "c": 2},
    "G4": {"a": 0},
    "G5": {"a.x": 0},
    "G6": {"a": 0, "ab": 0},
    "G7": {"a.x": 0, "a.y": 0, "ab": 1},
    "G8": {"layers.1.a": 0, "layers.1.b": 0, "layers.10": 0, "layers.2": 1},
    "G9": {"m.a": "cpu", "m.b": "cpu", "n": "disk", "o.p": 0},
    "G10": {"": 0},
    "G11": {"": 0, "a": 0},
    "Gx1": {},
    "Gx2": {"a.b.c": 0, "a.b.d": 0, "a.e": 0, "f": 1},
    "Gx3": {"a.b.c": 0, "a.b.d": 0, "a.e": 1, "f": 1},
    "Gx4": {"h.0": 0, "h.1": 0, "h.2": "cpu", "h.3": "cpu", "h.10": "disk", "ln": "disk"},
    "Gx5": {"x.weight": 0, "x.bias": 0},
    "Gx6": {"a": "cpu", "b": "cpu", "c.d": "cpu"},
    "Gx7": {"model.layers.0": 0, "model.layers.1": 0, "model.norm": 1, "lm_head": 1},
    "Gx8": {"a.0": 0, "a.1": "0"},
}


def clean_case(case_id, mapping) -> dict:
    before = pairs(mapping)
    after = am.clean_device_map(dict(mapping))
    return {"id": case_id, "function": "clean_device_map", "input": before, "expected": pairs(after)}


# --------------------------------------------------------------------------- H: check_device_map

H_CASES = [
    ("H1", "F1", {"": 0}),
    ("H2", "F1", {"linear1": 0, "linear2": 1}),
    ("H3", "F1", {"linear1": 0, "linear2": 1, "batchnorm": 1}),
    ("H4", "F1", {"linear1": "cpu", "batchnorm": "cpu", "linear2": "cpu", "invalid_module": 0, "another_invalid": 1}),
    ("H5", "F1", {"linear1.weight": 0, "linear1.bias": 0, "batchnorm": 1, "linear2": 1}),
    ("H6", "F1", {"linear1.weight": 0, "batchnorm": 1, "linear2": 1}),
    ("H7", "F1", {"linear": 0, "batchnorm": 1}),
    ("H8", "F1", {"": 0, "foo": 1}),
    ("H9", "F1", {}),
    ("H10", "H10", {"linear1.weight": 0, "linear1.bias": 0, "batchnorm": 1, "linear2": 1}),
    ("Hx1", "F17", {"wte": 0, "wpe": 0, "h": 0, "ln_f": 0}),
    ("Hx2", "F17", {"wte": 0, "wpe": 0, "h": 0, "ln_f": 0, "lm_head": 1}),
    ("Hx3", "F17", {"wte": 0, "wpe": 0, "h.0": 0, "h.1.ln1": 0, "h.1.attn.c_attn": 0, "h.1.attn.c_proj": 0,
                    "h.1.ln2": 1, "h.1.mlp": 1, "h.2": 1, "h.3": 1, "ln_f": 1, "lm_head": 0}),
    ("Hx4", "F15", {"big": 0, "lin": 0}),
    ("Hx5", "F15", {"big": 0, "lin": 0, "buf": 0}),
    ("Hx6", "F6", {"linear1.weight": 0, "linear1.bias": 0, "batchnorm": 1, "linear2": 1}),
    ("Hx7", "F14", {"0": 0}),
    ("Hx8", "F13", {str(i): 0 for i in range(15)}),
]


def check_case(case_id, tree, mapping, extra=None) -> dict:
    model = build(tree)
    r = run_captured(lambda: am.check_device_map(model, mapping))
    case = {"id": case_id, "function": "check_device_map", "tree": tree, "device_map": pairs(mapping),
            "warnings": [w["message"] for w in r["warnings"]], "raises": r.get("raises")}
    if extra:
        case.update(extra)
    return case


# --------------------------------------------------------------------------- I: get_max_memory

I_CASES = [
    ("I1", {"cpu": "1GB", 1: "1MiB", 0: 5, "disk": "2GB"}),
    ("I2", {"mps": 100, "cpu": 5}),
    ("I3", {-1: 100}),
    ("I4", {"0": 100}),
    ("I5", {"gpu": 100}),
    ("I6", {"cuda:0": 100}),
    ("Ix1", {}),
    ("Ix2", {"disk": "1GB", "cpu": "2GB", 3: "1KiB", 1: 0, 2: "1.5GB"}),
    ("Ix3", {0: "1Gb", "cpu": "1gb"}),
    ("Ix4", {0: 1.5, "cpu": 2.5}),
    ("Ix5", {0: "-1GB"}),
    ("Ix6", {0: "1TB"}),
    ("Ix7", {"cpu": "10GB", "mps": "1GB", 0: "1GB"}),
    ("Ix8", {0: True}),
    ("Ix9", {"CPU": 100}),
]


def gen_max_memory() -> list:
    c = []
    for cid, mm in I_CASES:
        given = dict(mm)
        inp = pairs(mm)
        r = run_captured(lambda: am.get_max_memory(given), keep_device_logs=True)
        case = {"id": cid, "function": "get_max_memory", "input": inp,
                "logs": r["logs"]}
        if "raises" in r:
            case["raises"] = r["raises"]
        else:
            case["expected"] = pairs(r["value"])
        case["caller_dict_after"] = pairs(given)  # strings converted in place (§9.16)
        c.append(case)
    return c


# --------------------------------------------------------------------------- J/K: infer_auto_device_map


def infer_case(case_id, tree, max_memory, ns=None, dtype=None, special=None, offload_buffers=False,
               fallback=False, clean=True, bug=None, note=None) -> dict:
    model = build(tree)
    mm_in = pairs(max_memory)
    mm = dict(max_memory)
    r = run_captured(
        lambda: am.infer_auto_device_map(
            model, max_memory=mm, no_split_module_classes=ns, dtype=dtype, special_dtypes=special, verbose=True,
            clean_result=clean, offload_buffers=offload_buffers, fallback_allocation=fallback,
        )
    )
    case: dict[str, Any] = {
        "id": case_id, "function": "infer_auto_device_map", "tree": tree, "max_memory": mm_in,
        "no_split": sorted(ns) if isinstance(ns, set) else ns, "no_split_is_set": isinstance(ns, set),
        "dtype": dtype, "special_dtypes": special, "offload_buffers": offload_buffers,
        "fallback_allocation": fallback, "clean_result": clean, "verbose": True,
    }
    if "raises" in r:
        case["raises"] = r["raises"]
        if bug is None and r["raises"]["type"] == "IndexError":
            bug = "§9.2" if tree == "F14" else "§9.1"
        if bug is None and r["raises"]["type"] == "AttributeError" and fallback:
            bug = "§9.9"
    else:
        dm = r["value"]
        case["expected"] = pairs(dm)
        chk = run_captured(lambda: am.check_device_map(build(tree), dm))
        case["check_device_map"] = chk.get("raises")
        if chk.get("raises") and bug is None:
            bug = "§9.3"
    case["verbose_lines"] = r["stdout"]
    case["logs"] = r["logs"]
    case["warnings"] = [w["message"] for w in r["warnings"]]
    if bug is None:
        ints = sorted(k for k in max_memory if isinstance(k, int))
        if ints and max_memory[ints[0]] == 0:
            bug = "§9.8"
    if bug:
        case["bug"] = bug
    if note:
        case["note"] = note
    return case


J_CASES = [
    ("J1", "F1", {0: 200, 1: 200}, {}),
    ("J2", "F1", {0: 200, 1: 172, 2: 200}, {}),
    ("J3", "D11", {0: 200, 1: 200}, {}),
    ("J4", "F2", {0: 500, 1: 500}, {}),
    ("J5", "F2", {0: 500, 1: 500}, {"ns": ["ModelForTest"]}),
    ("J6", "F3A", {0: 400, 1: 500}, {}),
    ("J7", "F3B", {0: 400, 1: 500}, {}),
    ("J8", "F3C", {0: 400, 1: 500}, {}),
    ("J9", "F4", {0: 250, 1: 400}, {}),
    ("J10", "F5", {0: 4, "cpu": 96000}, {}),
    ("J11", "F6", {0: 400, "cpu": "1GB"}, {}),
    ("J12", "F6", {0: 400, "cpu": "1GB"}, {"offload_buffers": True}),
    ("J13", "F7", {0: 400, 1: 400, "cpu": "1GB"}, {}),
    ("J14", "F7", {0: 400, 1: 200, "cpu": "1GB"}, {}),
    ("J15", "F7", {0: 400, 1: 200, "cpu": "1GB"}, {"offload_buffers": True}),
    ("J16", "F8", {0: 256}, {}),
    ("J17", "F8", {0: 256}, {"fallback": True}),
    ("J18", "F9", {0: 30}, {"fallback": True}),
    ("J19", "F10", {0: 5000}, {"fallback": True}),
    ("J20", "F11", {0: 600}, {"fallback": True}),
    ("J21", "F12", {0: 678}, {"fallback": True}),
    ("J22", "F1", {0: 300, 1: 300}, {"ns": {"Linear"}}),
    ("Jx_spec_4_1_no_cpu", "F1", {0: 235}, {}),
    ("Jx_bug1_ML15", "F13", {0: 500, "cpu": 2000}, {}),
    ("Jx_bug2_SharedSeq", "F14", {0: 300, "cpu": 2000}, {}),
    ("Jx_bug7_ToyGPT", "F17", {0: 2000, 1: 8000, "cpu": 20000}, {"ns": ["Block"]}),
    ("Jx_bug8_zero_gpu", "F1", {0: 0, 1: 200}, {}),
    ("Jx_bug9_float_budget", "F1", {0: 50.5, "cpu": 1000}, {"fallback": True}),
    ("Jx_split_F1", "F1", {0: 150, 1: 500}, {}),
    ("Jx_split_ToyGPT", "F17", {0: 4000, 1: 6000, "cpu": 40000}, {}),
    ("Jx_bool_sizes", "F17", {0: 3000, "cpu": 20000}, {"ns": ["Block"]}),
]


def budget_sets(total: int, max_layer: int) -> dict[str, dict]:
    """Named max_memory budgets scaled to a model (all ints)."""
    t = max(int(total), 1)
    m = max(int(max_layer), 1)
    return {
        "loose": {0: 10 * t, "cpu": 10 * t},
        "tight_gpu_cpu": {0: t // 2, "cpu": 10 * t},
        "multi_gpu": {0: t // 2, 1: t // 2, 2: t // 2},
        "gpu_cpu_tight": {0: t // 3, "cpu": t // 3 + m},
        "gpu_cpu_disk": {0: t // 4, "cpu": t // 4, "disk": 10 * t},
        "cpu_only": {"cpu": t // 2},
        "no_cpu_key": {0: t // 2},
        "zero_gpu": {0: 0, 1: t, "cpu": t},
        "two_gpu_cpu": {0: t // 3, 1: t // 3, "cpu": t},
        "exact_total": {0: t + m, "cpu": t},
    }


def gen_infer_j() -> list:
    """The J cases of accelerate-cases.md plus hand-made bug demonstrations."""
    return [
        infer_case(cid, tree, mm, ns=kw.get("ns"), offload_buffers=kw.get("offload_buffers", False),
                   fallback=kw.get("fallback", False))
        for cid, tree, mm, kw in J_CASES
    ]


def gen_infer_k() -> list:
    """Generated cases (the missing section K): every tree x budgets x options."""
    c = []
    for tree in MODELS:
        model = build(tree)
        sizes = am.compute_module_sizes(model)
        total = sizes[""]
        max_layer, _ = am.get_max_layer_size(root_queue(model), am.compute_module_sizes(model), [])
        for bname, mm in budget_sets(total, max_layer).items():
            for ns in (None, no_split_for(tree)):
                for dt in (None, "float16"):
                    tag = f"K_{tree}_{bname}_{'ns' if ns else 'nons'}_{dt}"
                    c.append(infer_case(tag, tree, mm, ns=ns, dtype=dt))
            c.append(infer_case(f"K_{tree}_{bname}_offload_buffers", tree, mm, offload_buffers=True))
            c.append(infer_case(f"K_{tree}_{bname}_fallback", tree, mm, fallback=True))
            c.append(infer_case(f"K_{tree}_{bname}_noclean", tree, mm, clean=False))
    return c


# --------------------------------------------------------------------------- L: balanced memory

L_CASES = [
    ("L1", "F1", {0: 200, 1: 200}, {}),
    ("L2", "F1", {0: 200, 2: 200}, {}),
    ("L3", "F1", {0: 300, 1: 300}, {}),
    ("L4", "F1", {0: 300, 1: 500}, {}),
    ("L5", "F1", {0: 300, "cpu": 1000}, {}),
    ("L6", "F1", {0: 0, 1: 300, 2: 300}, {}),
    ("L7", "F1", {0: 0, "cpu": 100}, {}),
    ("L8", "F1", {0: 300, 1: 300}, {"ns": {"Linear"}}),
    ("Lx_seq3", "F2", {0: 1000, 1: 1000}, {}),
    ("Lx_seq3_ns", "F2", {0: 1000, 1: 1000}, {"ns": ["ModelForTest"]}),
    ("Lx_low_zero", "F1", {0: 300, 1: 300}, {"low_zero": True}),
    ("Lx_bug10_disk_key", "F1", {0: 300, 1: 300, "disk": 1000}, {"bug": "§9.10"}),
    ("Lx_bug5_positional", "F1", {0: 1000, 1: 0, 2: 1000}, {"low_zero": True, "bug": "§9.5"}),
    ("Lx_bug5_keyerror1", "F1", {0: 1000, 2: 1000, 3: 1000}, {"low_zero": True, "bug": "§9.5"}),
    ("Lx_bug5_keyerror0", "F1", {1: 1000, 2: 1000}, {"low_zero": True, "bug": "§9.5"}),
    ("Lx_bug6_first_instance", "F17", {0: 8000, 1: 8000}, {"ns": ["Block", "Embedding"], "bug": "§9.6"}),
]


def balanced_case(case_id, tree, mm, ns=None, dtype=None, low_zero=False, bug=None) -> dict:
    model = build(tree)
    given = dict(mm)
    r = run_captured(
        lambda: am.get_balanced_memory(model, max_memory=given, no_split_module_classes=ns, dtype=dtype,
                                       low_zero=low_zero)
    )
    strategy = "balanced_low_0" if low_zero else "balanced"
    case: dict[str, Any] = {"id": case_id, "function": "get_balanced_memory", "strategy": strategy, "tree": tree,
                            "max_memory": pairs(mm), "no_split": sorted(ns) if isinstance(ns, set) else ns,
                            "dtype": dtype, "low_zero": low_zero, "logs": r["logs"]}
    if "raises" in r:
        case["raises"] = r["raises"]
    else:
        budgets = r["value"]
        case["expected"] = pairs(budgets)
        m = run_captured(lambda: am.infer_auto_device_map(build(tree), max_memory=dict(budgets),
                                                          no_split_module_classes=ns, dtype=dtype))
        case["map"] = pairs(m["value"]) if "value" in m else None
        case["map_raises"] = m.get("raises")
        case["map_warnings"] = [w["message"] for w in m["warnings"]]
    if bug:
        case["bug"] = bug
    return case


def sequential_case(case_id, tree, mm, ns=None, dtype=None) -> dict:
    given = dict(mm)
    budgets = run_captured(lambda: am.get_max_memory(given))["value"]
    m = run_captured(lambda: am.infer_auto_device_map(build(tree), max_memory=dict(budgets),
                                                      no_split_module_classes=ns, dtype=dtype))
    return {"id": case_id, "function": "get_max_memory", "strategy": "sequential", "tree": tree,
            "max_memory": pairs(mm), "no_split": ns, "dtype": dtype, "low_zero": False,
            "expected": pairs(budgets), "map": pairs(m["value"]) if "value" in m else None,
            "map_raises": m.get("raises"), "map_warnings": [w["message"] for w in m["warnings"]], "logs": []}


def gen_balanced() -> list:
    c = []
    for cid, tree, mm, kw in L_CASES:
        c.append(balanced_case(cid, tree, mm, ns=kw.get("ns"), low_zero=kw.get("low_zero", False),
                               bug=kw.get("bug")))
    for tree in MODELS:
        total = int(am.compute_module_sizes(build(tree))[""])
        t = max(total, 1)
        sets = {
            "two_half": {0: t // 2, 1: t // 2},
            "two_full": {0: t, 1: t},
            "three_cpu": {0: t // 3, 1: t // 3, 2: t // 3, "cpu": t},
            "zero_first": {0: 0, 1: t, 2: t},
            "one_gpu": {0: t, "cpu": t},
            "four_big": {0: 2 * t, 1: 2 * t, 2: 2 * t, 3: 2 * t},
        }
        for bname, mm in sets.items():
            for ns in (None, no_split_for(tree)):
                for dt in (None, "float16"):
                    for lz in (False, True):
                        tag = f"Lgen_{tree}_{bname}_{'ns' if ns else 'nons'}_{dt}_{'low0' if lz else 'bal'}"
                        c.append(balanced_case(tag, tree, mm, ns=ns, dtype=dt, low_zero=lz))
                c.append(sequential_case(f"Lgen_{tree}_{bname}_{'ns' if ns else 'nons'}_seq", tree, mm, ns=ns))
    return c


# --------------------------------------------------------------------------- main


def main() -> int:
    os.makedirs(OUT, exist_ok=True)
    gen_trees()
    write("dtype_sizes.json", gen_dtype_sizes())
    write("size_strings.json", gen_size_strings())
    write("module_sizes.json", gen_module_sizes())
    write("max_layer_size.json", gen_max_layer())
    write("tied_parameters.json", gen_tied())
    clean = [clean_case(cid, m) for cid, m in G_CASES.items()]
    checks = [check_case(cid, tree, m) for cid, tree, m in H_CASES]
    infer_j = gen_infer_j()
    infer_k = gen_infer_k()
    for case in infer_j + infer_k:
        if "expected" in case and not case["clean_result"]:
            raw = {k: v for k, v in case["expected"]}
            clean.append(clean_case(f"Ggen_{case['id']}", raw))
        if "expected" in case and case["check_device_map"] is not None and len(checks) < 200:
            checks.append(check_case(f"Hgen_{case['id']}", case["tree"], {k: v for k, v in case["expected"]},
                                     {"bug": "§9.3"}))
    write("clean_device_map.json", clean)
    write("check_device_map.json", checks)
    write("max_memory.json", gen_max_memory())
    write("infer_auto_device_map.json", infer_j)
    for tree in MODELS:  # one file per tree keeps every file well under 1 MB
        write(f"infer_generated/{tree}.json", [c for c in infer_k if c["tree"] == tree])
    write("balanced_memory.json", gen_balanced())
    return 0


if __name__ == "__main__":
    sys.exit(main())
