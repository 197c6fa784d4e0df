"""Reading config files: :func:`load_config` is the one loader of config files (yacs or
LazyConfig, with overrides) that ``train_net.py``, the tools and the teacher builder share.

detectron2 and fvcore fall back to ``yaml.unsafe_load`` for files with Python tags (such as
``!!python/object/apply:os.system``), which runs the code they name; MasKD reads every YAML
config with PyYAML's safe loader (:func:`read_yaml`), saved LazyConfigs with
:class:`LazyYamlLoader`, and yacs files through :class:`MasKDCfgNode`.
"""

import dataclasses
import functools
import os
import stat
from typing import List, Sequence, Union

import yaml
from detectron2.config import CfgNode as CN
from detectron2.config import LazyConfig, get_cfg
from detectron2.model_zoo import get_config_file
from fvcore.common.config import BASE_KEY
from omegaconf import DictConfig, OmegaConf

from ..utils.extensions import registered_after_the_config
from .defaults import add_maskd_config

__all__ = [
    "load_config",
    "get_maskd_cfg",
    "is_lazy_config",
    "resolve_config_file",
    "shipped_config_file",
    "SHIPPED_CONFIG_ROOT",
    "read_yaml",
    "LazyYamlLoader",
    "MasKDCfgNode",
    "ZOO_PREFIX",
    "locate_name",
    "partial_call",
    "local_config_files",
]

# `_BASE_: "zoo:COCO-Detection/faster_rcnn_R_50_FPN_3x.yaml"` names a detectron2 model-zoo config,
# so the project's YAML files hold only their deltas over detectron2's own configs.
ZOO_PREFIX = "zoo:"


class DuplicateKeyError(yaml.YAMLError):
    """A YAML mapping names one key twice (PyYAML keeps the last one without a word)."""


class AliasBombError(yaml.YAMLError):
    """A YAML document whose aliases expand it far beyond its own size."""


# A document may grow by its aliases to this many times its own nodes, plus this many nodes.
_EXPANSION_FACTOR, _EXPANSION_SLACK = 10, 10_000


def _check_expansion(root) -> None:
    """Fail if ``root``'s aliases (nodes reached more than once) would expand the document
    beyond :data:`_EXPANSION_FACTOR` times its own size (a "billion laughs" file of a few
    hundred bytes makes 10^9 nodes; a 20 KB string repeated 900 times, 18 MB), or if a node
    contains itself. Sizes count a node as 1 plus the characters of a scalar."""
    sizes, active, distinct = {}, set(), 0
    stack = [(root, False)]
    while stack:  # iterative: a deep file does not reach Python's recursion limit
        node, done = stack.pop()
        key = id(node)
        if done:
            active.discard(key)
            children = _children(node)
            sizes[key] = _own_size(node) + sum(sizes[id(c)] for c in children)
            continue
        if key in sizes:
            continue
        if key in active:
            raise AliasBombError(
                f"an alias refers to a node that contains it (line {node.start_mark.line + 1}): "
                "the document would be infinite"
            )
        active.add(key)
        distinct += _own_size(node)
        stack.append((node, True))
        stack.extend((c, False) for c in _children(node) if id(c) not in sizes)
    expanded = sizes[id(root)]
    if expanded > _EXPANSION_FACTOR * distinct + _EXPANSION_SLACK:
        raise AliasBombError(
            f"its aliases expand the file's {distinct} units of YAML (nodes and scalar "
            f"characters) to {expanded}: more than {_EXPANSION_FACTOR} times its own (a config "
            "needs no such repetition)"
        )


def _own_size(node) -> int:
    return 1 + (len(node.value) if isinstance(node, yaml.ScalarNode) else 0)


def _children(node) -> list:
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    if isinstance(node, yaml.MappingNode):
        return [n for pair in node.value for n in pair]
    return []


_MERGE = "tag:yaml.org,2002:merge"
# The deepest nesting of mappings and lists a config may have (detectron2's have under ten):
# PyYAML's composer recurses once per level and fails past a few thousand with a raw
# RecursionError.
MAX_DEPTH = 100
# The largest config file read (detectron2's and the project's are a few KB).
MAX_CONFIG_BYTES = 4 << 20


class NestingError(yaml.YAMLError):
    """A YAML document nested deeper than :data:`MAX_DEPTH`."""


class _DepthBound:
    """Mixin of a PyYAML loader: fail, naming the line, at nesting deeper than
    :data:`MAX_DEPTH` (PyYAML's ``Composer.compose_node`` recurses once per level)."""

    _depth = 0

    def compose_node(self, parent, index):
        self._depth += 1
        try:
            if self._depth > MAX_DEPTH:
                raise NestingError(
                    f"nested more than {MAX_DEPTH} levels deep (line "
                    f"{self.peek_event().start_mark.line + 1}); a config needs no such depth"
                )
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1


class _ComposingLoader(_DepthBound, yaml.SafeLoader):
    """The safe loader's composer with the depth bound: the node tree, no object built."""


def read_config_text(filename: str) -> str:
    """A config file's text: a regular file (a link to one is followed) of at most
    :data:`MAX_CONFIG_BYTES`, never more read than that (``/dev/zero``, a FIFO, a device are
    refused before anything is read).

    Raises:
        ValueError: naming the file, if it is not a regular file, is too large or not text.
    """
    st = os.stat(filename)
    if not stat.S_ISREG(st.st_mode):
        raise ValueError(f"config file '{filename}' is not a regular file (a device, a FIFO?)")
    with open(filename, "rb") as f:
        data = f.read(MAX_CONFIG_BYTES + 1)
    if len(data) > MAX_CONFIG_BYTES:
        raise ValueError(
            f"config file '{filename}' is larger than {MAX_CONFIG_BYTES >> 20} MB: not a config"
        )
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"config file '{filename}' is not UTF-8 text ({e})") from None


class SafeUniqueKeyLoader(_DepthBound, yaml.SafeLoader):
    """PyYAML's safe loader that refuses a key repeated in one mapping (in a config, a second
    ``LOSS_WEIGHT: 0.0`` further down would silently switch distillation off), a merge key
    ``<<`` repeated in one mapping (one of the two would be dropped), and a document that its
    aliases expand far beyond its own size (:func:`_check_expansion`). Keys that YAML merges
    (``<<: *anchor``) may still be overridden, as YAML means them to be."""

    def construct_document(self, node):
        _check_expansion(node)
        return super().construct_document(node)

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen = {}
            merges = [k.start_mark.line + 1 for k, _ in node.value if k.tag == _MERGE]
            if len(merges) > 1:  # PyYAML keeps one of them without a word
                raise DuplicateKeyError(
                    f"the merge key '<<' appears {len(merges)} times in one mapping (lines "
                    f"{', '.join(map(str, merges))}); YAML would keep one without a word: merge "
                    "several mappings with one key, '<<: [*first, *second]'"
                )
            for key_node, _ in node.value:
                if key_node.tag == _MERGE or not isinstance(key_node, yaml.ScalarNode):
                    continue
                key = self.construct_object(key_node)
                if key in seen:
                    raise DuplicateKeyError(
                        f"the key '{key}' appears twice in one mapping (lines {seen[key]} and "
                        f"{key_node.start_mark.line + 1}); YAML would keep the second without "
                        "a word, so say which one you mean"
                    )
                seen[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep=deep)


class LazyYamlLoader(SafeUniqueKeyLoader):
    """PyYAML's safe loader plus the few Python tags that ``LazyConfig.save`` writes into
    saved LazyConfig files, each constructed without running code and without importing
    anything: ``python/tuple``; ``python/object:`` of detectron2's ``ShapeSpec``;
    ``python/name:`` (a callable named) and ``python/object/apply:functools.partial``, both as
    ``_target_`` entries (:func:`locate_name`, :func:`partial_call`), resolved when the config
    is instantiated, as every ``_target_`` is. Every other Python tag is refused, as by the safe
    loader."""


def locate_name(name: str):
    """The object that ``name`` (a dotted path) names: what a saved LazyConfig's
    ``!!python/name:`` tag stands for, resolved at instantiation."""
    from detectron2.utils.registry import locate

    return locate(name)


def partial_call(func, args=(), keywords=None):
    """``functools.partial(func, *args, **keywords)``: what a saved LazyConfig's
    ``functools.partial`` tag stands for, made at instantiation."""
    return functools.partial(func, *args, **(keywords or {}))


# as _target_ strings: the public names (maskd.config), stable wherever this module lives
_LOCATE = f"{__name__.split('.')[0]}.config.locate_name"
_PARTIAL = f"{__name__.split('.')[0]}.config.partial_call"


def _tuple(loader, node):
    return tuple(loader.construct_sequence(node, deep=True))


def _object(loader, suffix, node):
    from detectron2.layers import ShapeSpec

    if suffix != "detectron2.layers.shape_spec.ShapeSpec" or not isinstance(node, yaml.MappingNode):
        raise yaml.constructor.ConstructorError(
            None, None, f"python/object:{suffix} is not constructed", node.start_mark
        )
    fields = loader.construct_mapping(node, deep=True)
    unknown = sorted(set(fields) - {f.name for f in dataclasses.fields(ShapeSpec)})
    if unknown:
        raise yaml.constructor.ConstructorError(
            None, None, f"ShapeSpec has no field(s) {unknown}", node.start_mark
        )
    return ShapeSpec(**fields)


def _name(loader, suffix, node):
    if not suffix or not all(part.isidentifier() for part in suffix.split(".")):
        raise yaml.constructor.ConstructorError(
            None, None, f"python/name:{suffix} is not a dotted name", node.start_mark
        )
    # nothing is imported while the file is read: the name is located at instantiation
    return {"_target_": _LOCATE, "name": suffix}


def _apply(loader, suffix, node):
    if suffix != "functools.partial" or not isinstance(node, yaml.MappingNode):
        raise yaml.constructor.ConstructorError(
            None, None, f"python/object/apply:{suffix} is not constructed", node.start_mark
        )
    value = loader.construct_mapping(node, deep=True)
    args, state = value.get("args", ()), value.get("state")
    ok = set(value) <= {"args", "state"} and isinstance(args, (list, tuple)) and len(args) >= 1
    if state is not None:
        ok = ok and isinstance(state, (list, tuple)) and len(state) == 4
        ok = ok and isinstance(state[1], (list, tuple)) and isinstance(state[2], (dict, type(None)))
        ok = ok and state[3] in (None, {})
    if not ok:
        raise yaml.constructor.ConstructorError(
            None,
            None,
            "a functools.partial tag must hold 'args' (the function first) and optionally "
            "'state' (function, args, keywords, None), as LazyConfig.save writes it",
            node.start_mark,
        )
    func, extra, keywords = args[0], list(args[1:]), {}
    if state is not None:
        func, extra, keywords = state[0], list(state[1]), dict(state[2] or {})
    return {"_target_": _PARTIAL, "func": func, "args": extra, "keywords": keywords}


LazyYamlLoader.add_constructor("tag:yaml.org,2002:python/tuple", _tuple)
LazyYamlLoader.add_multi_constructor("tag:yaml.org,2002:python/object:", _object)
LazyYamlLoader.add_multi_constructor("tag:yaml.org,2002:python/name:", _name)
LazyYamlLoader.add_multi_constructor("tag:yaml.org,2002:python/object/apply:", _apply)


def read_yaml(filename: str, loader=SafeUniqueKeyLoader) -> dict:
    """A YAML config file as a dict, read with PyYAML's safe loader, no key repeated (or
    ``loader``, a subclass of it such as :class:`LazyYamlLoader`): no Python tags.

    detectron2 and fvcore fall back to ``yaml.unsafe_load`` for files with tags such as
    ``!!python/object/apply:os.system``, which runs the code they name; MasKD never does.

    Raises:
        ValueError: naming the file, if it holds a Python tag, is not YAML, repeats a key in a
            mapping, is empty, or is not a mapping of keys.
    """
    text = read_config_text(filename)
    try:
        data = yaml.load(text, Loader=loader)
    except yaml.constructor.ConstructorError as e:
        mark = f" (line {e.problem_mark.line + 1})" if e.problem_mark else ""
        raise ValueError(
            f"config file '{filename}' holds a Python tag{mark}: {e.problem}. MasKD reads YAML "
            "configs with the safe loader, so nothing of it was run; a config file needs no "
            "tags (detectron2 would run them with yaml.unsafe_load)"
        ) from None
    except (AliasBombError, NestingError) as e:
        raise ValueError(f"config file '{filename}' is refused: {e}") from None
    except yaml.YAMLError as e:
        raise ValueError(f"config file '{filename}' is not valid YAML: {e}") from None
    if data is None:
        raise ValueError(f"config file '{filename}' is empty")
    if not isinstance(data, dict):
        raise ValueError(
            f"config file '{filename}' holds a {type(data).__name__}, not a mapping of keys"
        )
    return data


def _is_installed_zoo_config(filename: str) -> bool:
    """Whether ``filename`` is one of the configs inside the installed detectron2 package."""
    import detectron2.model_zoo

    root = os.path.realpath(os.path.join(os.path.dirname(detectron2.model_zoo.__file__), "configs"))
    return os.path.realpath(filename).startswith(root + os.sep)


def local_config_files(filename: str) -> List[str]:
    """``filename`` and the local files of its ``_BASE_`` chain (yacs), as absolute paths; a
    ``zoo:`` base, a missing or unreadable file ends the chain."""
    files: List[str] = []
    path = os.path.abspath(filename)
    while path not in files and os.path.isfile(path):
        files.append(path)
        if not path.endswith((".yaml", ".yml")):
            break
        try:
            base = read_yaml(path).get(BASE_KEY)
        except ValueError:
            break
        if not isinstance(base, str) or base.startswith(ZOO_PREFIX) or "://" in base:
            break
        path = os.path.abspath(_base_path(path, base))
    return files


def _base_path(filename: str, base: str) -> str:
    """The file a local ``_BASE_`` of ``filename`` names (``~`` expanded; relative to
    ``filename``'s folder)."""
    return os.path.join(os.path.dirname(filename), os.path.expanduser(base))


def _check_base(filename: str, base) -> None:
    """Fail, naming ``filename``, where its ``_BASE_`` is not one readable config: a list, a
    remote URL (not fetched), or a local file that does not exist."""
    if base is None or (isinstance(base, str) and base.startswith(ZOO_PREFIX)):
        return
    if not isinstance(base, str) or not base:
        raise ValueError(
            f"{filename}: _BASE_ must name one config file (a path, or 'zoo:NAME' for a "
            f"detectron2 model-zoo config), got {base!r}"
        )
    if "://" in base:
        raise ValueError(
            f"{filename}: _BASE_ '{base}' is a URL; config files are not fetched: download it "
            "and name the local file"
        )
    path = _base_path(filename, base)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{filename}: _BASE_ names '{base}', which is not a file ({path})")


class MasKDCfgNode(CN):
    """detectron2's CfgNode whose YAML files are read with the safe loader (:func:`read_yaml`,
    ``allow_unsafe`` is ignored) and whose ``_BASE_`` may also name a model-zoo config
    (``zoo:...``)."""

    _loading: list = []  # the chain of files being read, through their _BASE_

    @classmethod
    def load_yaml_with_base(cls, filename: str, allow_unsafe: bool = False):
        real = os.path.realpath(filename)
        if real in cls._loading:
            chain = cls._loading[cls._loading.index(real) :] + [real]
            raise ValueError("config files whose _BASE_ form a cycle: " + " -> ".join(chain))
        cls._loading.append(real)
        try:
            return cls._load_yaml_with_base(filename)
        finally:
            cls._loading.pop()

    @classmethod
    def _load_yaml_with_base(cls, filename: str):
        if _is_installed_zoo_config(filename):
            # detectron2's own configs, part of the installed package (Base-RetinaNet.yaml has
            # a python/object/apply:eval tag for its anchor sizes): trusted as its code is
            return super().load_yaml_with_base(filename, allow_unsafe=True)
        data = read_yaml(filename)
        base = data.get(BASE_KEY)
        _check_base(filename, base)
        if not (isinstance(base, str) and base.startswith(ZOO_PREFIX)):
            # fvcore reads the file (safe: checked above) and its _BASE_ files through this
            # method again
            return super().load_yaml_with_base(filename, allow_unsafe=False)
        name = base[len(ZOO_PREFIX) :]
        try:
            base_file = get_config_file(name)
        except RuntimeError as e:
            raise FileNotFoundError(
                f"{filename}: _BASE_ names '{name}', which is not a detectron2 model-zoo config"
            ) from e
        merged = cls.load_yaml_with_base(base_file)
        del data[BASE_KEY]

        def merge_a_into_b(a, b):
            for k, v in a.items():
                if isinstance(v, dict) and isinstance(b.get(k), dict):
                    merge_a_into_b(v, b[k])
                else:
                    b[k] = v

        merge_a_into_b(data, merged)
        return merged


# The configs shipped inside the package (in a checkout: a link to the repository's configs/),
# which maskd.model_zoo names.
SHIPPED_CONFIG_ROOT = os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "model_zoo", "configs"
)
_CONFIG_SUFFIXES = (".yaml", ".py")


def shipped_config_file(name: str) -> str:
    """The path of a config shipped with MasKD, by its name relative to the config folder (a
    leading ``configs/`` is accepted).

    Raises:
        RuntimeError: naming the config, if MasKD ships no config of that name (as
            ``detectron2.model_zoo.get_config_file`` does).
    """
    rel = name[len("configs/") :] if name.startswith("configs/") else name
    path = os.path.normpath(os.path.join(SHIPPED_CONFIG_ROOT, rel))
    inside = path.startswith(os.path.normpath(SHIPPED_CONFIG_ROOT) + os.sep)
    if not inside or not rel.endswith(_CONFIG_SUFFIXES) or not os.path.isfile(path):
        raise RuntimeError(
            f"'{name}' is not a config shipped with MasKD (maskd.model_zoo.list_configs() lists "
            "them)"
        )
    return path


def resolve_config_file(name_or_path: str, what: str = "MODEL.MASKD.TEACHER.CONFIG_FILE") -> str:
    """A config path: an existing file, a detectron2 model-zoo config name, or the name of a
    config shipped with MasKD (:mod:`maskd.model_zoo`, e.g. ``Teachers/...``).

    Raises:
        FileNotFoundError: naming ``what`` and the value, if it is none of them.
    """
    if not name_or_path:
        raise FileNotFoundError(f"{what} is empty: name the teacher's config file")
    if os.path.isfile(name_or_path):
        return name_or_path
    for zoo in (get_config_file, shipped_config_file):
        try:
            return zoo(name_or_path)
        except RuntimeError:
            pass
    raise FileNotFoundError(
        f"{what} = '{name_or_path}' is neither an existing file, a detectron2 model-zoo config "
        "name (e.g. 'COCO-Detection/faster_rcnn_R_101_FPN_3x.yaml') nor a config shipped with "
        "MasKD (maskd.model_zoo.list_configs())"
    )


# The top-level keys of a LazyConfig (detectron2's LazyConfig.save writes these); a yacs file's
# are upper case (MODEL, SOLVER, ...) or _BASE_.
LAZY_TOP_KEYS = ("model", "train", "dataloader", "optimizer", "lr_multiplier")


def is_lazy_config(path: str) -> bool:
    """Whether ``path`` is a LazyConfig: a .py file, or a .yaml whose top level has a
    LazyConfig's keys (:data:`LAZY_TOP_KEYS`, as ``LazyConfig.save`` writes them) and no yacs
    key (upper case, such as ``MODEL``, or ``_BASE_``). A LazyConfig's ``_target_`` entries run
    when the model is built; a yacs file runs nothing.

    Raises:
        ValueError: a .yaml whose top level mixes the two, naming the keys of each.
    """
    if path.endswith(".py"):
        return True
    try:  # no objects built: tags are fine here
        node = yaml.compose(read_config_text(path), Loader=_ComposingLoader)
    except NestingError as e:
        raise ValueError(f"config file '{path}' is refused: {e}") from None
    except (yaml.YAMLError, OSError):
        return False
    if not isinstance(node, yaml.MappingNode):
        return False
    keys = [k.value for k, _ in node.value if isinstance(k, yaml.ScalarNode)]
    lazy = [k for k in keys if k in LAZY_TOP_KEYS]
    yacs = [k for k in keys if isinstance(k, str) and (k.isupper() or k == "_BASE_")]
    if lazy and yacs:
        raise ValueError(
            f"'{path}' mixes a yacs config's top-level keys ({', '.join(yacs)}) with a "
            f"LazyConfig's ({', '.join(lazy)}): a .yaml is read as one or the other (a "
            "LazyConfig's _target_ entries run when the model is built); write it as one"
        )
    return bool(lazy)


def load_config(path: str, opts: Sequence[str] = ()) -> Union[CN, DictConfig]:
    """Load a config file with command-line overrides.

    Args:
        path: a yacs .yaml (detectron2's keys plus ``MODEL.MASKD``; ``_BASE_`` may name a model-zoo
            config as ``zoo:...``) or a LazyConfig .py / saved .yaml.
        opts: overrides: yacs ``["KEY", "VALUE", ...]``, LazyConfig ``["key=value", ...]``.

    Returns:
        a yacs CfgNode (not frozen) or a LazyConfig DictConfig.

    A ``.py`` LazyConfig is a Python script: loading it runs it, and ``_target_`` entries of
    any LazyConfig name callables that run when the model is built, as in detectron2. YAML
    files are read without Python tags (:func:`read_yaml`).

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: naming the file, if a YAML file is empty, not a mapping or holds a Python
            tag.
    """
    if not os.path.exists(path):
        raise FileNotFoundError(f"config file not found: '{path}'")
    read_config_text(path)  # a regular file of a config's size, or a named refusal
    if is_lazy_config(path):
        if path.endswith(".py"):
            cfg = LazyConfig.load(path)
        else:  # as LazyConfig.load reads YAML, without its yaml.unsafe_load
            data = read_yaml(path, LazyYamlLoader)
            cfg = OmegaConf.create(data, flags={"allow_objects": True})
        return LazyConfig.apply_overrides(cfg, list(opts))
    cfg = get_maskd_cfg()
    try:
        cfg.merge_from_file(path)
        cfg.merge_from_list(list(opts))
    except (KeyError, AssertionError) as e:  # yacs: KeyError (files), AssertionError (lists)
        if "MODEL.MASKD." not in str(e) or "Non-existent" not in str(e):
            raise
        raise registered_after_the_config(
            f"{path}: {e.args[0] if e.args else e}. A key under MODEL.MASKD that belongs to a "
            "head-level KD term or mask source of your own exists once its module is imported"
        ) from None
    return cfg


def get_maskd_cfg() -> CN:
    """detectron2's default config plus the MasKD keys, able to read ``zoo:`` bases."""
    return MasKDCfgNode(add_maskd_config(get_cfg()))
