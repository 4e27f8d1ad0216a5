"""Loading rules for files that may come from strangers: no pickle, no remote code, checked configs.

- Weights load from safetensors only: `use_safetensors=True` is the default of `NanoI2VPipeline.from_pretrained`
  and of the model classes' `from_pretrained` (diffusers' own default falls back to pickle `.bin` files).
  Pickle weights load only when the caller opts in with `allow_pickle=True` (safetensors first, pickle
  where there are none) or `use_safetensors=False` (pickle only, diffusers' meaning); diffusers and
  transformers then read them with `torch.load(weights_only=True)`, which refuses pickled code.
- No code runs from a model folder: `trust_remote_code=True` and `custom_pipeline` are refused, and
  model_index.json may only name classes of nanoi2v_diffusers, diffusers and transformers.
- Configs are checked before anything is built: a config.json, scheduler_config.json or
  model_index.json with a missing, unknown or mistyped key raises `ConfigValidationError` naming the
  file and the key (diffusers fills missing keys with defaults and ignores unknown ones). The one
  exception: keys a class added after configs were first saved, listed in its `_config_keys_added_later`,
  whose defaults reproduce what the older files meant.
- Training checkpoints: accelerate unpickles `custom_checkpoint_*.pkl` (the EMA state) with
  `weights_only=False`; `check_checkpoint_pickles` first proves each loads with `weights_only=True`.
"""

import difflib
import importlib
import inspect
import json
import os
import types
import typing
from pathlib import Path
from typing import Any, Dict, Iterable, Mapping, Optional, Sequence, Tuple, Union

import torch
from diffusers.utils import logging

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
MODEL_INDEX = "model_index.json"  # a saved pipeline's index of components

logger = logging.get_logger(__name__)

PathLike = Union[str, os.PathLike]

SAFETENSORS_SUFFIXES = (".safetensors", ".safetensors.index.json")
# Modules model_index.json may name: importing any other module could run its import-time code.
ALLOWED_LIBRARIES = ("nanoi2v_diffusers", "diffusers", "transformers")
# Keyword arguments that would run code shipped with a model; never needed for this package.
REMOTE_CODE_KWARGS = ("trust_remote_code", "custom_pipeline", "custom_revision")
# accelerate's name for objects registered with `register_for_checkpointing` (read with weights_only=False).
CUSTOM_CHECKPOINT_GLOB = "custom_checkpoint_*.pkl"


class ConfigValidationError(ValueError):
    """A config file has a missing, unknown or mistyped key; the message names the file and the key."""


class UnsafeFileError(ValueError):
    """Loading would unpickle a file or run code shipped with a model, and the caller did not (or cannot) opt in."""


# ------------------------------------------------------------------------------------ keyword arguments


def refuse_remote_code(kwargs: Mapping[str, Any]) -> None:
    """Raise if `from_pretrained` keyword arguments ask to run code that comes with the model."""
    for name in REMOTE_CODE_KWARGS:
        if kwargs.get(name):
            raise UnsafeFileError(
                f"{name}={kwargs[name]!r}: nanoi2v_diffusers never runs code shipped with a model; "
                "every component class is part of nanoi2v_diffusers, diffusers or transformers. Drop the argument."
            )


def safe_loading_kwargs(kwargs: Mapping[str, Any]) -> Tuple[Dict[str, Any], bool]:
    """-> (`from_pretrained` keyword arguments for diffusers, whether pickle weights may be read).

    Remote code is refused. `use_safetensors` defaults to True; the opt-in `allow_pickle=True` (popped here)
    makes it default to None instead, diffusers' "safetensors where present, else pickle" mode. Passing
    `use_safetensors` explicitly (None or False) is an opt-in too: the pipeline passes it to each component.
    """
    refuse_remote_code(kwargs)
    kwargs = dict(kwargs)
    opted_in = bool(kwargs.pop("allow_pickle", False))
    kwargs.setdefault("use_safetensors", None if opted_in else True)
    return kwargs, kwargs["use_safetensors"] is not True


# ------------------------------------------------------------------------------------ config values


def _type_name(hint: Any) -> str:
    if isinstance(hint, type):
        return hint.__name__
    return str(hint).replace("typing.", "")


def _matches(value: Any, hint: Any) -> bool:
    """Whether a JSON value fits a type hint of an `__init__` parameter; True for hints it cannot judge."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any or hint is inspect.Parameter.empty:
        return True
    if hint is type(None):
        return value is None
    if origin in (Union, types.UnionType):
        return any(_matches(value, arg) for arg in args)
    if origin is typing.Literal:
        return value in args
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    if origin in (tuple, list) or hint in (tuple, list):
        return isinstance(value, (list, tuple)) and _items_match(value, args, variadic=origin is list)
    if origin is dict or hint is dict:
        return isinstance(value, dict)
    return True


def _items_match(items, args, variadic: bool) -> bool:
    if not args:
        return True
    if variadic or (len(args) == 2 and args[1] is Ellipsis):
        return all(_matches(item, args[0]) for item in items)
    return len(items) == len(args) and all(_matches(item, arg) for item, arg in zip(items, args))


def _init_parameters(cls) -> Dict[str, inspect.Parameter]:
    skipped = (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
    parameters = inspect.signature(cls.__init__).parameters
    return {name: p for name, p in parameters.items() if name != "self" and p.kind not in skipped}


def _init_hints(cls) -> Dict[str, Any]:
    try:
        return typing.get_type_hints(cls.__init__)
    except (NameError, TypeError):  # a hint that cannot be evaluated here: judge none of them
        return {}


def _accepted_class_names(cls) -> set:
    return {cls.__name__, *getattr(cls, "_compatibles", ())}


def validate_config(config: Mapping[str, Any], cls, source: str, strict: bool = True) -> None:
    """Check a config dict against `cls.__init__`; raise `ConfigValidationError` naming `source` and the key.

    Args:
        config: the parsed JSON (keys starting with "_" are diffusers' bookkeeping).
        cls: the `ConfigMixin` class the config is for.
        source: the file, for messages.
        strict: also refuse unknown and missing keys (the classes of this package, whose saved
            configs always hold every key); otherwise only `_class_name` and value types are checked.
    """
    if not isinstance(config, Mapping):
        raise ConfigValidationError(f"{source}: expected a JSON object, got {type(config).__name__}.")
    class_name = config.get("_class_name")
    if class_name is not None and class_name not in _accepted_class_names(cls):
        raise ConfigValidationError(
            f"{source}: key '_class_name' is {class_name!r}, but this file is loaded as {cls.__name__}."
        )
    parameters, hints = _init_parameters(cls), _init_hints(cls)
    public = {key: value for key, value in config.items() if not key.startswith("_")}
    if strict:
        _check_known_and_complete(public, parameters, source, getattr(cls, "_config_keys_added_later", ()))
    for key, value in public.items():
        parameter = parameters.get(key)
        if parameter is None or (value is None and parameter.default is None):
            continue
        if key in hints and not _matches(value, hints[key]):
            raise ConfigValidationError(f"{source}: key {key!r} must be {_type_name(hints[key])}; got {value!r}.")
    check_config_minimums(cls, public, source)


def check_config_minimums(cls, config: Mapping[str, Any], source: str) -> None:
    """Raise `ConfigValidationError` naming `source`, the key, the value and the rule when a count or size of
    `cls._config_minimums` ({key: smallest value}) is below it (for a list, any entry, or the list is empty)."""
    for key, minimum in getattr(cls, "_config_minimums", {}).items():
        value = config.get(key)
        if value is None or isinstance(value, bool):
            continue
        entries = list(value) if isinstance(value, (list, tuple)) else [value]
        if not entries or any(isinstance(entry, (int, float)) and entry < minimum for entry in entries):
            rule = f">= {minimum}"
            if isinstance(value, (list, tuple)):
                rule = f"every entry {rule}, at least one entry"
            raise ConfigValidationError(f"{source}: key {key!r} must be {rule}; got {value!r}.")


def _check_known_and_complete(
    public: Mapping[str, Any], parameters: Mapping[str, inspect.Parameter], source: str, added_later: Sequence[str] = ()
):
    for key in public:
        if key not in parameters:
            close = difflib.get_close_matches(key, list(parameters), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigValidationError(f"{source}: unknown key {key!r}{hint}.")
    for key, parameter in parameters.items():
        if key not in public and key not in added_later:
            has_default = parameter.default is not inspect.Parameter.empty
            default = f" (this version's default: {parameter.default!r})" if has_default else ""
            raise ConfigValidationError(
                f"{source}: missing key {key!r}{default}; the file is incomplete or was edited. Add the key with "
                "the value the weights were trained with."
            )


def read_json_file(path: PathLike) -> Any:
    """Parse a JSON file; a missing or malformed file raises `ConfigValidationError` naming it."""
    path = Path(path)
    if not path.is_file():
        raise ConfigValidationError(f"{path} is missing.")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ConfigValidationError(f"{path} is not valid JSON ({err}).") from None


def _is_own_class(cls) -> bool:
    return cls.__module__.split(".")[0] == "nanoi2v_diffusers"


# ------------------------------------------------------------------------------------ pipeline folders


def validate_pipeline_folder(folder: PathLike, pipeline_cls, allow_pickle: bool = False,
                             passed_components: Iterable[str] = ()) -> None:  # fmt: skip
    """Check a saved pipeline folder before diffusers imports or unpickles anything from it.

    model_index.json must name `pipeline_cls`, list every required component, and name for each a class of
    an allowed library that fits the pipeline's `__init__` annotation. Each component folder's config is
    validated (strictly for this package's classes), and model components need safetensors weights unless
    `allow_pickle`. Components in `passed_components` (passed to `from_pretrained`) are not read.
    """
    folder = Path(folder)
    index_path = folder / MODEL_INDEX
    index, expected = _read_model_index(index_path, pipeline_cls), _component_annotations(pipeline_cls)
    settings = {name: hint for name, hint in expected.items() if _is_setting(hint)}
    for name, hint in settings.items():  # plain values that `register_to_config` saved beside the components
        if index.get(name) is not None and not _matches(index[name], hint):
            raise ConfigValidationError(f"{index_path}: key {name!r} must be {hint}; got {index[name]!r}.")
    optional = set(getattr(pipeline_cls, "_optional_components", ()))
    for name, annotation in expected.items():
        if name in settings:
            continue
        where = f"{index_path}: component {name!r}"
        if name in passed_components or (name in optional and index.get(name, [None, None]) == [None, None]):
            continue
        if name not in index:
            raise ConfigValidationError(f"{index_path}: missing component key {name!r}.")
        component_cls = resolve_component_class(index[name], where)
        if component_cls is None:
            raise ConfigValidationError(f"{where} is required but set to null.")
        _check_component_class(component_cls, annotation, where)
        _validate_component_folder(folder / name, component_cls, allow_pickle)


def _read_model_index(index_path: Path, pipeline_cls) -> Dict[str, Any]:
    """model_index.json as a dict, checked to name `pipeline_cls` and only its components."""
    index = read_json_file(index_path)
    if not isinstance(index, dict):
        raise ConfigValidationError(f"{index_path}: expected a JSON object, got {type(index).__name__}.")
    class_name = index.get("_class_name")
    if class_name != pipeline_cls.__name__:
        raise ConfigValidationError(
            f"{index_path}: key '_class_name' is {class_name!r}, expected {pipeline_cls.__name__!r}."
        )
    expected = _init_parameters(pipeline_cls)
    for name in index:
        if not name.startswith("_") and name not in expected:
            raise ConfigValidationError(f"{index_path}: unknown component key {name!r}; expected {sorted(expected)}.")
    return index


_SETTING_TYPES = (str, int, float, bool)


def _is_setting(hint: Any) -> bool:
    """A pipeline `__init__` parameter of a plain type (or Optional of one) is a setting, not a component."""
    return all(arg in _SETTING_TYPES or arg is type(None) for arg in (typing.get_args(hint) or (hint,)))


def _component_annotations(pipeline_cls) -> Dict[str, Any]:
    hints = typing.get_type_hints(pipeline_cls.__init__)
    return {name: hints.get(name, Any) for name in _init_parameters(pipeline_cls)}


def resolve_component_class(spec: Any, where: str) -> Optional[type]:
    """The class a model_index.json entry `[library, class_name]` names; None for `[null, null]`.

    Only modules of `ALLOWED_LIBRARIES` are imported.
    """
    if not (isinstance(spec, list) and len(spec) == 2):
        raise ConfigValidationError(f"{where} must be [library, class_name]; got {spec!r}.")
    library, class_name = spec
    if library is None and class_name is None:
        return None
    if not (isinstance(library, str) and isinstance(class_name, str)):
        raise ConfigValidationError(f"{where} must be two strings [library, class_name]; got {spec!r}.")
    if library.split(".")[0] not in ALLOWED_LIBRARIES:
        raise ConfigValidationError(
            f"{where} names library {library!r}; only modules of {ALLOWED_LIBRARIES} are imported."
        )
    try:
        component_cls = getattr(importlib.import_module(library), class_name)
    except (ImportError, AttributeError) as err:
        raise ConfigValidationError(f"{where} names {library}.{class_name}, which cannot be imported ({err}).") from err
    if not isinstance(component_cls, type):
        raise ConfigValidationError(f"{where} names {library}.{class_name}, which is not a class.")
    return component_cls


def _check_component_class(component_cls: type, annotation: Any, where: str) -> None:
    candidates = typing.get_args(annotation) or (annotation,)  # Optional[X] -> X
    allowed = [cls for cls in candidates if isinstance(cls, type) and cls is not type(None)]
    if not allowed:
        return
    fits = any(issubclass(component_cls, cls) or component_cls.__name__ in getattr(cls, "_compatibles", ())
               for cls in allowed)  # fmt: skip
    if not fits:
        names = " or ".join(cls.__name__ for cls in allowed)
        raise ConfigValidationError(f"{where} is a {component_cls.__name__}, but the pipeline needs a {names}.")


def _validate_component_folder(component_dir: Path, component_cls: type, allow_pickle: bool) -> None:
    if not component_dir.is_dir():
        raise ConfigValidationError(f"{component_dir} is missing (listed in {MODEL_INDEX}).")
    config_name = getattr(component_cls, "config_name", None)
    if config_name is not None and hasattr(component_cls, "register_to_config"):  # a diffusers ConfigMixin
        config_path = component_dir / config_name
        strict = _is_own_class(component_cls)
        validate_config(read_json_file(config_path), component_cls, str(config_path), strict=strict)
    if issubclass(component_cls, torch.nn.Module):
        check_weight_files(component_dir, allow_pickle)


def check_weight_files(folder: PathLike, allow_pickle: bool = False) -> None:
    """Raise `UnsafeFileError` unless `folder` holds safetensors weights (or pickle ones and `allow_pickle`)."""
    folder = Path(folder)
    names = [path.name for path in folder.iterdir() if path.is_file()]
    if any(name.endswith(SAFETENSORS_SUFFIXES) for name in names):
        return
    pickles = sorted(name for name in names if name.endswith(PICKLE_SUFFIXES))
    if not pickles:
        raise UnsafeFileError(f"{folder} holds no weights (no .safetensors file).")
    if not allow_pickle:
        raise UnsafeFileError(
            f"{folder} holds only pickle weights ({', '.join(pickles)}); unpickling can run arbitrary code, so only "
            "safetensors are loaded. Convert them to safetensors, or, if you trust their source, pass "
            "allow_pickle=True to load them with torch.load(weights_only=True)."
        )
    logger.warning(f"Loading pickle weights from {folder} ({', '.join(pickles)}) with torch.load(weights_only=True).")


# ------------------------------------------------------------------------------------ model classes


class SafeLoadingMixin:
    """`from_pretrained` with safetensors only by default, no remote code, and a validated config.json.

    Put it first among a diffusers model's bases: `class MyModel(SafeLoadingMixin, ModelMixin, ConfigMixin)`.
    """

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: PathLike, **kwargs):
        kwargs, allow_pickle = safe_loading_kwargs(kwargs)
        folder = Path(pretrained_model_name_or_path, kwargs.get("subfolder") or "")
        if folder.is_dir():  # a local folder: say why pickle-only weights are refused (Hub repos: diffusers' error)
            check_weight_files(folder, allow_pickle)
        return super().from_pretrained(pretrained_model_name_or_path, **kwargs)

    @classmethod
    def load_config(cls, pretrained_model_name_or_path: PathLike, return_unused_kwargs: bool = False,
                    return_commit_hash: bool = False, **kwargs):  # fmt: skip
        outputs = super().load_config(pretrained_model_name_or_path, return_unused_kwargs=return_unused_kwargs,
                                      return_commit_hash=return_commit_hash, **kwargs)  # fmt: skip
        config = outputs[0] if isinstance(outputs, tuple) else outputs
        source = Path(pretrained_model_name_or_path, kwargs.get("subfolder") or "", cls.config_name)
        validate_config(config, cls, str(source), strict=_is_own_class(cls))
        return outputs


# ------------------------------------------------------------------------------------ single files


def load_state_dict_file(path: PathLike, allow_pickle: bool = False) -> Dict[str, torch.Tensor]:
    """Tensors of one weight file: safetensors always; pickle formats only with `allow_pickle`, and then
    with `torch.load(weights_only=True)`."""
    path = Path(path)
    if path.name.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(str(path))
    if not path.name.endswith(PICKLE_SUFFIXES):
        raise ValueError(f"{path}: not a weight file (expected .safetensors, or {', '.join(PICKLE_SUFFIXES)}).")
    if not allow_pickle:
        raise UnsafeFileError(
            f"{path} is a pickle file; unpickling can run arbitrary code. Pass allow_pickle=True if you trust its "
            "source (it is then read with torch.load(weights_only=True)), or convert it to safetensors."
        )
    return torch.load(path, map_location="cpu", weights_only=True)


def check_checkpoint_pickles(checkpoint_dir: PathLike) -> None:
    """Prove every `custom_checkpoint_*.pkl` of an accelerate checkpoint loads with `weights_only=True`.

    accelerate's `load_state` reads these files with `weights_only=False`, which would run any code
    pickled into them; a checkpoint whose files hold more than tensors and numbers is refused.
    """
    for path in sorted(Path(checkpoint_dir).glob(CUSTOM_CHECKPOINT_GLOB)):
        try:
            torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # noqa: BLE001 - any failure means the file is not plain tensors
            raise UnsafeFileError(
                f"{path} does not load with torch.load(weights_only=True) ({type(err).__name__}); accelerate would "
                "unpickle it with weights_only=False, which can run arbitrary code. Refusing to resume from it."
            ) from None


def check_local_path(name: str, value: Optional[PathLike], hub_ok: bool = True) -> None:
    """Raise at once, naming the setting, when `value` names a local folder that does not exist.

    A missing path that could be a Hub repo id (`user/model`) is left to the Hub (or its cache) when `hub_ok`,
    unless its first part is a local folder (`outputs/run` where outputs/ exists): then it is a local path.
    """
    if value is None or Path(value).exists():
        return
    text = str(value)
    parts = text.split("/")
    could_be_repo_id = (hub_ok and len(parts) == 2 and all(parts) and not text.startswith((".", "~"))
                        and not Path(parts[0]).is_dir())  # fmt: skip
    if could_be_repo_id:
        try:
            from huggingface_hub.utils import HFValidationError, validate_repo_id

            validate_repo_id(text)
            return
        except HFValidationError:
            pass
    kind = "a Hub repo id here" if hub_ok else "a Hub repo id (a local folder is needed)"
    raise ValueError(f"{name}: no such folder {text!r} (a local path that does not exist, and not {kind}).")


# Exceptions (by class name, anywhere in an error's chain) that mean the Hub could not be reached or was not asked.
_HUB_UNREACHABLE = ("ConnectError", "ConnectTimeout", "ConnectionError", "TimeoutError", "ReadTimeout",
                    "OfflineModeIsEnabled", "LocalEntryNotFoundError")  # fmt: skip


def hub_unreachable(error: BaseException) -> Optional[BaseException]:
    """The error in `error`'s chain that says the Hub could not be reached (or offline mode kept it out); None."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if any(name in type(error).__name__ for name in _HUB_UNREACHABLE):
            return error
        error = error.__cause__ or error.__context__
    return None


def not_found_error(name: str, value: PathLike, error: BaseException) -> OSError:
    """The error for `value` (a local path that does not exist, or a Hub id) that loading could not find."""
    offline = " (HF_HUB_OFFLINE is set)" if os.environ.get("HF_HUB_OFFLINE") else ""
    return OSError(
        f"{name} {str(value)!r} is not a local folder, and the Hub could not be asked for it{offline}: "
        f"{type(hub_unreachable(error) or error).__name__}. For a local folder, check the path (a folder written "
        "by save_pretrained); for a "
        "Hub repo, check the network, or download it once online (it is then found offline in the cache)."
    )
