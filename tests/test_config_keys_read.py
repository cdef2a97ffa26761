"""No setting that nothing reads: every key of every run config (m2m_pipeline/configs/*.yaml) is read by something.

- a resource's config key must be a field of its resource class (the classes of definitions.local_resources());
- every field of those classes must be *read* somewhere in the package: `<resource>.<field>` on a variable bound to
  the resource (a parameter annotated with its class, or named by its resource key as Dagster injects it), a
  `getattr(<resource>, "<field>")`, or `self.<field>` inside one of the class's methods that something uses (called
  on the resource from outside the class, a Dagster lifecycle hook, or called by another used method). Validators
  do not count (checking a value is not using it), nor do declarations, constructor calls or dict keys;
- `execution.config` must fit the config schema of the executor of the profile the file is for.

Found by the AST, not by grepping names: `.dtype` and "dtype" occur all over the code for tensors and
configs, and a field read only in a method nobody calls is still unread.
"""

from __future__ import annotations

import ast
import textwrap
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "m2m_pipeline"
CONFIGS = sorted((PACKAGE / "configs").glob("*.yaml"))
HOOKS = {"setup_for_execution", "teardown_after_execution", "yield_for_execution", "create_resource"}
VALIDATOR_DECORATORS = {"model_validator", "field_validator", "validator", "root_validator"}


def resource_classes() -> dict[str, type]:
    from m2m_pipeline.definitions import local_resources

    return {key: type(value) for key, value in local_resources().items()}


# ------------------------------------------------------------------------------------------- the reader analysis
def _mentions(annotation: ast.expr | None, name: str) -> bool:
    if annotation is None:
        return False
    for node in ast.walk(annotation):
        if isinstance(node, ast.Name) and node.id == name or isinstance(node, ast.Attribute) and node.attr == name:
            return True
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and name in node.value:
            return True
    return False


def _bound_names(fn: ast.FunctionDef | ast.AsyncFunctionDef, cls: str, key: str) -> set[str]:
    """The names in `fn` bound to an instance of `cls`: parameters annotated with it, or named `key` (unannotated)."""
    args = fn.args
    bound = set()
    for arg in [*args.posonlyargs, *args.args, *args.kwonlyargs]:
        if _mentions(arg.annotation, cls) or (arg.arg == key and arg.annotation is None):
            bound.add(arg.arg)
    for node in ast.walk(fn):  # x = context.resources.<key>, or x = <cls>(...)
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            value = node.value
            if isinstance(value, ast.Attribute) and value.attr == key and isinstance(value.value, ast.Attribute) \
                    and value.value.attr == "resources":
                bound.add(node.targets[0].id)
            if isinstance(value, ast.Call) and isinstance(value.func, ast.Name) and value.func.id == cls:
                bound.add(node.targets[0].id)
    return bound


def _accesses(tree: ast.AST, names: set[str]) -> set[str]:
    """Attribute names read on `names` in `tree`: `n.attr` (not as an assignment target) and getattr(n, "attr")."""
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in names \
                and not isinstance(node.ctx, ast.Store):
            out.add(node.attr)
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "getattr" \
                and len(node.args) >= 2 and isinstance(node.args[0], ast.Name) and node.args[0].id in names \
                and isinstance(node.args[1], ast.Constant) and isinstance(node.args[1].value, str):
            out.add(node.args[1].value)
    return out


def _is_validator(fn: ast.AST) -> bool:
    for deco in getattr(fn, "decorator_list", []):
        target = deco.func if isinstance(deco, ast.Call) else deco
        name = target.attr if isinstance(target, ast.Attribute) else getattr(target, "id", "")
        if name in VALIDATOR_DECORATORS:
            return True
    return False


def unread_fields(trees: dict[str, ast.AST], cls: str, key: str, fields: set[str]) -> set[str]:
    """The `fields` of class `cls` (resource key `key`) that nothing in `trees` reads (the rules of this module)."""
    methods: dict[str, ast.AST] = {}
    class_nodes = []
    for tree in trees.values():
        for node in ast.walk(tree):
            if isinstance(node, ast.ClassDef) and node.name == cls:
                class_nodes.append(node)
                methods.update({m.name: m for m in node.body if isinstance(m, ast.FunctionDef | ast.AsyncFunctionDef)})
    assert class_nodes, f"class {cls} not found in the package"
    inside = {id(n) for c in class_nodes for n in ast.walk(c)}
    outside_reads: set[str] = set()
    for tree in trees.values():
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and id(node) not in inside:
                bound = _bound_names(node, cls, key)
                if bound:
                    outside_reads |= _accesses(node, bound)
    used = {m for m in methods if m in HOOKS or m in outside_reads}
    todo = list(used)
    while todo:  # methods the used methods call on self
        for name in _accesses(methods[todo.pop()], {"self"}):
            if name in methods and name not in used:
                used.add(name)
                todo.append(name)
    self_reads = set()
    for name in used:
        if not _is_validator(methods[name]):
            self_reads |= _accesses(methods[name], {"self"})
    return fields - outside_reads - self_reads


def package_trees() -> dict[str, ast.AST]:
    return {str(p.relative_to(ROOT)): ast.parse(p.read_text(encoding="utf-8")) for p in sorted(PACKAGE.rglob("*.py"))}


# ------------------------------------------------------------------------------------------- the tests
@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_resource_key_is_a_field_of_its_resource(path):
    classes = resource_classes()
    resources = (yaml.safe_load(path.read_text()) or {}).get("resources") or {}
    for key, entry in resources.items():
        assert key in classes, f"{path.name}: resources.{key} is not a resource of the code location ({sorted(classes)})"
        config = (entry or {}).get("config") or {}
        fields = set(classes[key].model_fields)
        for name in config:
            assert name in fields, f"{path.name}: resources.{key}.config.{name} is not a field of {classes[key].__name__}"
        classes[key](**config)  # its own validators (nested train / mis / eval keys are fields of their classes)


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_execution_keys_fit_the_executor_schema(path):
    from dagster._config import validate_config

    from m2m_pipeline.orchestration.jobs import profile_executor
    from m2m_pipeline.orchestration.profiles import PROFILES

    execution = (yaml.safe_load(path.read_text()) or {}).get("execution")
    if execution is None:
        pytest.skip(f"{path.name} has no execution section (its executor config is written at launch)")
    if path.stem == "paper":
        pytest.importorskip("dagster_k8s")  # without it the paper jobs fall back to the multiprocess executor
    executor = profile_executor(PROFILES[path.stem])
    result = validate_config(executor.config_schema.config_type, execution.get("config") or {})
    assert result.success, f"{path.name}: execution.config: " + "; ".join(e.message for e in result.errors)


def test_every_resource_field_is_read_by_the_code():
    trees = package_trees()
    unread = {}
    for key, cls in resource_classes().items():
        missing = unread_fields(trees, cls.__name__, key, set(cls.model_fields))
        if missing:
            unread[f"{cls.__name__} (resources.{key})"] = sorted(missing)
    assert not unread, f"resource fields nothing reads (give them a reader or remove them): {unread}"


def test_the_analysis_tells_a_read_from_a_declaration():
    """The checker itself: a field used only by a method nobody calls, by a validator, or as a tensor's `.dtype`
    elsewhere, is unread; `compute.dtype`, a getattr, or a used method's self.<field> is a read."""
    source = textwrap.dedent('''
        class ComputeResource:
            dtype: str = "float32"
            device: str = "auto"
            workers: int = 0
            threads: int = 0

            @model_validator(mode="after")
            def _check(self):
                return self.threads

            def torch_dtype(self):
                return self.dtype

            def resolved(self):
                return self._inner()

            def _inner(self):
                return self.device

        def step(x, compute: ComputeResource):
            return x.dtype, compute.resolved(), getattr(compute, "workers")
    ''')
    fields = {"dtype", "device", "workers", "threads"}
    assert unread_fields({"a.py": ast.parse(source)}, "ComputeResource", "compute", fields) == {"dtype", "threads"}
    fixed = source + "\ndef other(compute):\n    return compute.dtype, compute.threads\n"
    assert unread_fields({"a.py": ast.parse(fixed)}, "ComputeResource", "compute", fields) == set()
