"""Quantization recipes: ordered `pattern -> ggml type` rules over GGUF tensor names, plus defaults.

A recipe is a small TOML file (configs/recipes/*.toml, or any path):

    name = "edge-balanced"
    description = "routed experts ~4-bit, down projections a step higher, the rest higher"
    default = "q4_k"              # quantizable tensors no rule matches
    token_embedding = "q6_k"      # token_embd.weight (with tied embeddings it is also the output matrix)
    output = "q6_k"               # output.weight, when the model has one

    [[rules]]                     # first matching rule wins, like llama-quantize's --tensor-type
    pattern = 'ffn_down_exps'     # a regular expression searched (not full-matched) in the tensor name
    type = "q5_k"

Semantics follow llama.cpp's quantizer (src/llama-quant.cpp) so that what `recipe show` explains is what the file
gets: 1-D tensors, `*_norm.weight` and the router `ffn_gate_inp.weight` are never quantized; the token embedding
and output types take precedence over rules; a type whose block size does not divide a tensor's rows would make
llama.cpp silently fall back to another type, so we report it as an error instead. `resolve()` turns a recipe plus a
model into one explicit type per tensor, which is what quantize.py hands to llama.cpp.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from .errors import EdgeMoEError
from .store import configs_dir
from .tomlfile import load_toml

# Types a user may name in a recipe. Lower-case names as llama.cpp prints them (ggml_type_name).
_TYPE_NAMES = (
    "f32 f16 bf16 q8_0 q6_k q5_k q5_0 q5_1 q4_k q4_0 q4_1 iq4_nl iq4_xs q3_k iq3_s iq3_xxs q2_k "
    "iq2_s iq2_xs iq2_xxs iq1_m iq1_s mxfp4"
).split()
# Very low-bit types llama.cpp refuses to produce without an importance matrix (tensor_requires_imatrix).
NEEDS_IMATRIX = {"iq3_xxs", "iq2_xxs", "iq2_xs", "iq2_s", "iq1_m", "iq1_s"}
UNQUANTIZED = {"f32", "f16", "bf16"}
GROUPS = ("experts", "shared", "dense_ffn", "attention", "embeddings", "other")


def ggml_type(name: str):
    """The gguf.GGMLQuantizationType for a recipe type name (case-insensitive), or an EdgeMoEError."""
    import gguf

    key = name.strip().lower()
    if key not in _TYPE_NAMES:
        raise EdgeMoEError(f"unknown quantization type {name!r}", "use one of: " + ", ".join(_TYPE_NAMES))
    return gguf.GGMLQuantizationType[key.upper()]


def type_name(qtype) -> str:
    return qtype.name.lower()


def block_info(type_: str) -> tuple[int, int]:
    """(elements per block, bytes per block) of a type."""
    import gguf

    return gguf.GGML_QUANT_SIZES[ggml_type(type_)]


def tensor_bytes(n_elements: int, type_: str) -> int:
    block, size = block_info(type_)
    return n_elements // block * size


@dataclass
class Rule:
    pattern: str
    type: str


@dataclass
class Recipe:
    name: str
    description: str = ""
    default: str = "q4_0"
    token_embedding: str | None = None
    output: str | None = None
    rules: list[Rule] = field(default_factory=list)
    source: str = ""

    def to_toml(self) -> str:
        """The recipe as TOML text that load_recipe() reads back unchanged."""
        lines = [f"name = {_q(self.name)}", f"description = {_q(self.description)}", f"default = {_q(self.default)}"]
        if self.token_embedding:
            lines.append(f"token_embedding = {_q(self.token_embedding)}")
        if self.output:
            lines.append(f"output = {_q(self.output)}")
        for r in self.rules:
            lines += ["", "[[rules]]", f"pattern = {_q_pattern(r.pattern)}", f"type = {_q(r.type)}"]
        return "\n".join(lines) + "\n"


def _q(s: str) -> str:
    """A TOML basic string: backslash, quote and every control character escaped."""
    out = []
    for ch in s:
        if ch in ('"', "\\"):
            out.append("\\" + ch)
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append({"\n": "\\n", "\t": "\\t", "\r": "\\r"}.get(ch, f"\\u{ord(ch):04X}"))
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


def _q_pattern(pattern: str) -> str:
    # a literal string keeps a regex readable (no doubled backslashes); it cannot hold ' or control characters
    if "'" in pattern or any(ord(ch) < 0x20 or ord(ch) == 0x7F for ch in pattern):
        return _q(pattern)
    return f"'{pattern}'"


def recipes_dir() -> Path:
    return configs_dir() / "recipes"


def builtin_names() -> list[str]:
    return sorted(p.stem for p in recipes_dir().glob("*.toml"))


def load_recipe(name_or_path: str | Path) -> Recipe:
    """A built-in recipe by name (configs/recipes/NAME.toml) or a recipe TOML file by path."""
    path = Path(name_or_path)
    if not (path.suffix == ".toml" or path.exists()):
        path = recipes_dir() / f"{name_or_path}.toml"
        if not path.is_file():
            raise EdgeMoEError(
                f"no recipe named {name_or_path!r}",
                "built-in recipes: " + ", ".join(builtin_names()) + "; or pass a path to a .toml file",
            )
    if not path.is_file():
        raise EdgeMoEError(f"recipe file {path} does not exist", "check the path")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise EdgeMoEError(f"recipe {path} is not valid TOML: {e}", "fix the file's syntax") from e
    data = load_toml(text, f"recipe {path}")
    return parse_recipe(data, source=str(path))


# A recipe's name becomes a file name (quantize's default output <store>/gguf/<model>/<name>.gguf and its manifest)
NAME = re.compile(r"[A-Za-z0-9._-]+")
# Longest time all of a recipe's patterns may take over all of a model's tensor names: real recipes take
# milliseconds; a pattern that backtracks catastrophically, like (.|.)*Z, would take hours.
MATCH_SECONDS = 10.0


def parse_recipe(data: dict, source: str = "<recipe>") -> Recipe:
    """Check a recipe's structure, value types, name, type names and regular expressions; return it."""
    known = {"name", "description", "default", "token_embedding", "output", "rules"}
    if extra := set(data) - known:
        raise EdgeMoEError(
            f"{source}: unknown key(s) {', '.join(sorted(extra))}", "allowed: " + ", ".join(sorted(known))
        )
    for key in known - {"rules"}:
        if key in data and not isinstance(data[key], str):
            raise EdgeMoEError(f"{source}: `{key}` is {data[key]!r}, not a string", "quote it")
    if not isinstance(data.get("rules", []), list):
        raise EdgeMoEError(f"{source}: `rules` must be an array of [[rules]] tables", "see configs/recipes/")
    rules = []
    for i, r in enumerate(data.get("rules", [])):
        if not isinstance(r, dict) or set(r) != {"pattern", "type"}:
            raise EdgeMoEError(f"{source}: rule {i + 1} must have exactly `pattern` and `type`", "see configs/recipes/")
        for key in ("pattern", "type"):
            if not isinstance(r[key], str):
                raise EdgeMoEError(f"{source}: rule {i + 1} {key} is {r[key]!r}, not a string", "quote it")
        try:
            re.compile(r["pattern"])
        except (re.error, RecursionError, OverflowError) as e:
            raise EdgeMoEError(
                f"{source}: rule {i + 1} pattern {r['pattern']!r} is not a valid regex ({e})",
                "escape dots as \\. and check brackets",
            ) from e
        ggml_type(r["type"])
        rules.append(Rule(r["pattern"], r["type"].lower()))
    if "name" in data:
        name = data["name"]
        if not NAME.fullmatch(name):
            raise EdgeMoEError(
                f"{source}: name {name!r} may only hold letters, digits, '.', '_' and '-'",
                'it names the output file; e.g. name = "edge-16gb"',
            )
    else:  # a file's own name, made safe the same way
        name = re.sub(r"[^A-Za-z0-9._-]+", "-", Path(source).stem) or "recipe"
    recipe = Recipe(
        name=name,
        description=data.get("description", ""),
        default=data.get("default", "q4_0").lower(),
        token_embedding=(data["token_embedding"].lower() if data.get("token_embedding") else None),
        output=(data["output"].lower() if data.get("output") else None),
        rules=rules,
        source=source,
    )
    for t in (recipe.default, recipe.token_embedding, recipe.output):
        if t:
            ggml_type(t)
    return recipe


# ---- a model's tensors ----


@dataclass
class TensorInfo:
    name: str
    shape: tuple[int, ...]  # ggml order: shape[0] is the row length (ne0)
    type: str
    n_elements: int


def read_tensors(model: str | Path) -> tuple[list[TensorInfo], int]:
    """The tensors of a GGUF file and the bytes of everything that is not tensor data (header, metadata, padding)."""
    import gguf

    path = Path(model)
    if not path.is_file():
        raise EdgeMoEError(f"model {path} does not exist", "pass a .gguf file (see `edgemoe convert`)")
    try:
        reader = gguf.GGUFReader(path)
    except Exception as e:  # GGUFReader raises ValueError/struct errors on foreign files
        raise EdgeMoEError(
            f"{path} is not a readable GGUF file ({e})", "pass a .gguf file made by `edgemoe convert`"
        ) from e
    tensors = [
        TensorInfo(t.name, tuple(int(x) for x in t.shape), type_name(t.tensor_type), int(t.n_elements))
        for t in reader.tensors
    ]
    overhead = path.stat().st_size - sum(int(t.n_bytes) for t in reader.tensors)
    return tensors, overhead


def quantizable(t: TensorInfo) -> bool:
    """Whether llama.cpp's quantizer would touch this tensor at all (tensor_allows_quantization)."""
    return (
        len(t.shape) >= 2
        and t.name.endswith("weight")
        and "_norm.weight" not in t.name
        and "ffn_gate_inp.weight" not in t.name
    )


def group_of(name: str) -> str:
    if "_exps." in name:
        return "experts"
    if "_shexp." in name:
        return "shared"
    if name.startswith(("token_embd", "output.")):
        return "embeddings"
    if re.search(r"\.attn_(q|k|v|output|qkv)\.", name):
        return "attention"
    if re.search(r"\.ffn_(gate|up|down)\.", name):
        return "dense_ffn"
    return "other"


# ---- resolving a recipe against a model ----


@dataclass
class TensorPlan:
    name: str
    shape: list[int]
    group: str
    source_type: str
    type: str
    rule: str  # what decided the type: "rule N: PATTERN", "token_embedding", "output", "default", "not quantized"
    bytes: int
    bpw: float


@dataclass
class Problem:
    severity: str  # "error" blocks quantization; "warning" is reported
    message: str


@dataclass
class GroupSummary:
    group: str
    tensors: int
    params: int
    bytes: int
    bpw: float


@dataclass
class Explanation:
    recipe: str
    description: str
    model: str
    tensors: list[TensorPlan]
    groups: list[GroupSummary]
    tensor_bytes: int
    overhead_bytes: int
    total_bytes: int  # predicted file size
    bpw: float
    problems: list[Problem]

    @property
    def errors(self) -> list[Problem]:
        return [p for p in self.problems if p.severity == "error"]


def resolve(
    recipe: Recipe, tensors: list[TensorInfo], have_imatrix: bool = True
) -> tuple[list[TensorPlan], list[Problem]]:
    """One explicit type per tensor, and everything llama.cpp would refuse or silently change."""
    problems: list[Problem] = []
    matches = _match_table(recipe, tensors)
    hits = [0] * len(recipe.rules)
    reached_quantizable = [0] * len(recipe.rules)
    has_output = any(t.name == "output.weight" for t in tensors)
    plans = []
    for t, row in zip(tensors, matches):
        matched = next((i for i, hit in enumerate(row) if hit), None)
        for i, hit in enumerate(row):
            if hit:
                hits[i] += 1
        if not quantizable(t):
            type_, why = t.type, "not quantized"
        elif t.name == "token_embd.weight" and recipe.token_embedding:
            type_, why = recipe.token_embedding, "token_embedding"
        elif t.name == "output.weight" and recipe.output:
            type_, why = recipe.output, "output"
        elif matched is not None:
            type_, why = recipe.rules[matched].type, f"rule {matched + 1}: {recipe.rules[matched].pattern}"
            reached_quantizable[matched] += 1
        else:
            type_, why = recipe.default, "default"
        if quantizable(t):
            block, _ = block_info(type_)
            if t.shape[0] % block:
                problems.append(
                    Problem(
                        "error",
                        f"{t.name}: rows of {t.shape[0]} are not a multiple of {block} "
                        f"as {type_} needs (llama.cpp would silently use another type)",
                    )
                )
            if type_ in NEEDS_IMATRIX and not have_imatrix and t.name != "token_embd.weight":
                problems.append(Problem("error", f"{t.name}: {type_} needs an importance matrix (pass --imatrix)"))
            if t.type not in UNQUANTIZED and t.type != type_:
                problems.append(
                    Problem(
                        "error",
                        f"{t.name} is already {t.type}; requantizing loses quality "
                        "(quantize from an f32/f16/bf16 GGUF)",
                    )
                )
        if t.name == "token_embd.weight" and not has_output and quantizable(t):
            why += " (tied: also the output matrix)"
        nbytes = tensor_bytes(t.n_elements, type_)
        plans.append(
            TensorPlan(
                t.name, list(t.shape), group_of(t.name), t.type, type_, why, nbytes, 8.0 * nbytes / max(t.n_elements, 1)
            )
        )
    for i, r in enumerate(recipe.rules):
        if hits[i] == 0:
            problems.append(
                Problem("warning", f"rule {i + 1} ({r.pattern!r} -> {r.type}) matches no tensor in this model")
            )
        elif reached_quantizable[i] == 0:
            problems.append(
                Problem(
                    "warning",
                    f"rule {i + 1} ({r.pattern!r} -> {r.type}) never decides a type: "
                    "earlier rules, the embedding/output defaults or llama.cpp's "
                    "never-quantized tensors take all its matches",
                )
            )
    if not has_output and recipe.output and not any(t.name == "token_embd.weight" for t in tensors):
        problems.append(Problem("warning", "the model has no output.weight; `output` is unused"))
    return plans, problems


def _match_table(recipe: Recipe, tensors: list[TensorInfo]) -> list[list[bool]]:
    """[tensor][rule]: whether the rule's pattern is found in the tensor's name, within MATCH_SECONDS in all."""
    from .limits import TimeLimitExceeded, time_limit

    compiled = [re.compile(r.pattern) for r in recipe.rules]
    rule = 0
    table = []
    try:
        with time_limit(MATCH_SECONDS):
            for t in tensors:
                row = []
                for rule, rx in enumerate(compiled):
                    row.append(rx.search(t.name) is not None)
                table.append(row)
    except TimeLimitExceeded:
        r = recipe.rules[rule]
        raise EdgeMoEError(
            f"{recipe.source or recipe.name}: rule {rule + 1} pattern {r.pattern!r} takes more than "
            f"{MATCH_SECONDS:g} s to match the tensor names (it backtracks without end)",
            "simplify it: no nested or alternated repeats like (.|.)* or (a+)+",
        ) from None
    return table


def explain(recipe: Recipe, model: str | Path, have_imatrix: bool = True) -> Explanation:
    """`recipe show`: per tensor the deciding rule, type, bytes and bpw; per group and total sizes; problems."""
    tensors, overhead = read_tensors(model)
    plans, problems = resolve(recipe, tensors, have_imatrix)
    return _summarise(recipe, str(model), plans, overhead, problems)


def _summarise(recipe: Recipe, model: str, plans: list[TensorPlan], overhead: int, problems) -> Explanation:
    groups = []
    for g in GROUPS:
        members = [p for p in plans if p.group == g]
        if members:
            params = sum(_numel(p.shape) for p in members)
            nbytes = sum(p.bytes for p in members)
            groups.append(GroupSummary(g, len(members), params, nbytes, 8.0 * nbytes / max(params, 1)))
    tensor_total = sum(p.bytes for p in plans)
    params = sum(_numel(p.shape) for p in plans)
    return Explanation(
        recipe.name,
        recipe.description,
        model,
        plans,
        groups,
        tensor_total,
        overhead,
        tensor_total + overhead,
        8.0 * tensor_total / max(params, 1),
        problems,
    )


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n
