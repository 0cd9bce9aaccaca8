"""Checkpoints: every piece of training state, saved every N steps, restored on start.

The state is whatever the Trainer tracks: its models, optimizers, the global step, balancer
state, counters, random state and the training data iterator (where the dataset allows it), so
that rerunning the same command after a preemption resumes exactly where the last checkpoint
left it. What a restore promises:

* Intact or nothing. The newest checkpoint (by step, from the files themselves, not only
  TensorFlow's `checkpoint` state file) is read in full before anything is assigned; a damaged
  one (a missing or unreadable `.index`, a truncated or corrupt data file) is skipped with a
  warning that names it, and the newest intact one restores. When checkpoints exist and none
  restores, `CheckpointError` says so and nothing is deleted: a run never starts from step 0
  over existing checkpoints.
* Both ways or not at all. Every object of the program must have its value in the checkpoint and
  every value in the checkpoint its object in the program, with the same shapes (objects created
  later, such as the data iterator, a balancer's state and the logging window, are matched when
  they are created). A mismatch is a `CheckpointError` that says what differs, which options
  changed since the checkpoint's run, and how to start fresh or from the weights on purpose
  (`Trainer(init_from=...)`, `load_model_weights`).
* What the user gives wins for optimizer hyperparameters: a learning rate given on a rerun that
  differs from the one the checkpoint's run was given is assigned after the restore and noted
  (`Checkpoints.notes`, which the Trainer logs at the resume step). The values each run was
  given are kept beside the checkpoints in `run.json` (`RUN_RECORD`), with its options and the
  structure of its training batches: batches of another structure (another batch size) cannot
  continue the saved data position, so the data starts from its beginning, and the notes say so.

Saving: a data position that cannot be saved (a `tf.py_function` in the pipeline) is dropped
from that save and every later one (`data_error` says why, once); a save that fails without it
too (a full disk) raises, blaming no data. Unfinished saves' `ckpt-N_temp` folders left by a
killed process are removed by `remove_stale_temps` (the Trainer calls it holding the lock).
"""

from __future__ import annotations

import collections
import dataclasses
import json
import os
import re
from collections.abc import Mapping, Sequence

import keras
import tensorflow as tf
from absl import logging
from tensorflow.core.protobuf import trackable_object_graph_pb2

from termwise.trainer.errors import first_line

__all__ = [
    "RUN_RECORD",
    "CheckpointError",
    "Checkpoints",
    "Mismatch",
    "compare",
    "damage",
    "find_checkpoints",
    "load_model_weights",
    "resolve",
]

PREFIX = "ckpt"
RUN_RECORD = "run.json"
_GRAPH_KEY = "_CHECKPOINTABLE_OBJECT_GRAPH"
_NUMBERED = re.compile(rf"^{PREFIX}-(\d+)\.(index|data-\d+-of-\d+)$")
_TEMP = re.compile(rf"^{PREFIX}-\d+_temp$")
# Recorded options whose change is the normal course of a rerun (a longer run), not a change.
_RUN_LENGTH = frozenset({"steps", "until_step", "log_dir", "checkpoint_dir", "progress"})
# Recorded options a resumed run cannot honour: the checkpoint's random state continues.
_FIXED = frozenset({"seed"})
# Children that hold hyperparameters, not state: the user's value wins (see `Checkpoints`).
_HYPERPARAMETERS = frozenset({"_learning_rate"})


class CheckpointError(ValueError):
    """A checkpoint directory or file that cannot be restored as asked: one line, nothing lost."""


# ------------------------------------------------------------------------------------------
# Finding checkpoints, and telling intact ones from damaged ones.


def find_checkpoints(directory: str) -> list[tuple[int, str]]:
    """The numbered checkpoints (`ckpt-N`) in `directory`, newest (highest N) first.

    Found from their files (an `.index` or a data file) and from TensorFlow's `checkpoint`
    state file, which may be missing, garbled or stale: a checkpoint whose files exist counts
    whatever the state file says.
    """
    if not tf.io.gfile.isdir(directory):
        return []
    numbers = set()
    for name in tf.io.gfile.listdir(directory):
        match = _NUMBERED.match(name.rstrip("/"))
        if match:
            numbers.add(int(match[1]))
    return [(n, os.path.join(directory, f"{PREFIX}-{n}")) for n in sorted(numbers, reverse=True)]


def damage(prefix: str) -> str | None:
    """Why the checkpoint at `prefix` cannot be restored, or None when every tensor reads back.

    Every tensor is read (checksums included), one at a time, so a truncated or corrupt data
    file is found before anything is assigned.
    """
    if not tf.io.gfile.exists(prefix + ".index"):
        return "its .index file is missing"
    try:
        reader = tf.train.load_checkpoint(prefix)
    except (tf.errors.OpError, ValueError) as error:
        return f"its .index file cannot be read ({first_line(error)})"
    dtypes = reader.get_variable_to_dtype_map()
    if _GRAPH_KEY not in dtypes:
        return "it is not an object-based checkpoint (tf.train.Checkpoint)"
    with tf.device("CPU:0"):
        for key, dtype in sorted(dtypes.items()):
            try:
                tf.raw_ops.RestoreV2(
                    prefix=prefix, tensor_names=[key], shape_and_slices=[""], dtypes=[dtype]
                )
            except tf.errors.OpError as error:
                return f"{key} cannot be read ({first_line(error)})"
    return None


def resolve(path: str, option: str = "init_from") -> str:
    """The newest intact checkpoint at `path` (a checkpoint prefix, or a directory of them).

    Raises:
        CheckpointError: naming `option` when `path` holds no intact checkpoint.
    """
    if tf.io.gfile.isdir(path):
        found = find_checkpoints(path)
        if not found:
            raise CheckpointError(f"`{option}` ({path}) holds no checkpoint (no {PREFIX}-N files).")
        reasons = []
        for _, prefix in found:
            reason = damage(prefix)
            if reason is None:
                return prefix
            reasons.append(f"{os.path.basename(prefix)}: {reason}")
        raise CheckpointError(
            f"`{option}` ({path}): none of its checkpoints can be read ({'; '.join(reasons)})."
        )
    reason = damage(path)
    if reason is not None:
        raise CheckpointError(
            f"`{option}` ({path}) is not a readable checkpoint: {reason}; give a checkpoint "
            "prefix (.../ckpt-N) or a directory of checkpoints."
        )
    return path


# ------------------------------------------------------------------------------------------
# Matching a checkpoint against the program, both ways.


def _object_graph(reader) -> trackable_object_graph_pb2.TrackableObjectGraph:
    graph = trackable_object_graph_pb2.TrackableObjectGraph()
    graph.ParseFromString(reader.get_tensor(_GRAPH_KEY))
    return graph


def _children(obj) -> dict[str, object]:
    try:
        return dict(tf.train.TrackableView.children(obj))
    except (AttributeError, TypeError):
        return {}


def _has_values(obj) -> bool:
    """Whether the object saves tensors of its own (a variable, an iterator, a lookup table)."""
    base = tf.__internal__.tracking.Trackable
    return isinstance(obj, tf.Variable) or (
        isinstance(obj, base) and type(obj)._serialize_to_tensors is not base._serialize_to_tensors
    )


def _shape(obj) -> list[int] | None:
    shape = getattr(obj, "shape", None)
    if shape is None:
        return None
    try:
        return [int(d) for d in shape]
    except (TypeError, ValueError):
        return None


def _skipped(parent, name: str) -> bool:
    """Hyperparameters (an optimizer's learning rate): not state, the user's value wins."""
    return name in _HYPERPARAMETERS and isinstance(parent, keras.optimizers.Optimizer)


@dataclasses.dataclass
class Mismatch:
    """What differs between a checkpoint and the program's objects.

    Attributes:
        only_checkpoint: top-level names, then paths, of values the program has no object for.
        only_program: the same for the program's values the checkpoint lacks.
        shapes: "path: [a] in the checkpoint, [b] here" for values of another shape or kind.
    """

    only_checkpoint: list[str] = dataclasses.field(default_factory=list)
    only_program: list[str] = dataclasses.field(default_factory=list)
    shapes: list[str] = dataclasses.field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.only_checkpoint or self.only_program or self.shapes)

    def describe(self, limit: int = 3) -> str:
        def listed(items):
            shown = ", ".join(items[:limit])
            return shown + (f" and {len(items) - limit} more" if len(items) > limit else "")

        parts = []
        if self.only_checkpoint:
            parts.append(f"the checkpoint holds {listed(self.only_checkpoint)}, which this has not")
        if self.only_program:
            parts.append(f"this has {listed(self.only_program)}, which the checkpoint has not")
        if self.shapes:
            parts.append(f"{listed(self.shapes)}")
        return "; ".join(parts)


def compare(
    reader,
    children: Mapping[str, object],
    *,
    deferred: Sequence[str] = (),
    only: Sequence[str] | None = None,
) -> Mismatch:
    """Matches a checkpoint's object graph against the program's objects, both ways.

    The walk follows the checkpoint's edges by name from the root, as TensorFlow's restore does,
    and pairs each checkpoint node with the program's object at the same path. A value is missing
    on one side, or differs in shape, or one checkpoint value meets two different objects (a
    layer inserted: the optimizer's variable list and the model's layers no longer agree).

    Args:
        reader: a `tf.train.load_checkpoint` reader.
        children: the program's top-level objects, by the names they are saved under.
        deferred: top-level names whose objects are created later (skipped on both sides).
        only: compare only these top-level names.

    Returns:
        A `Mismatch`, empty (falsy) when everything matches.
    """
    graph = _object_graph(reader)
    shapes = reader.get_variable_to_shape_map()
    mismatch = Mismatch()
    skip = set(deferred) | {"save_counter"}
    matched: dict[int, object] = {}
    first_path: dict[int, str] = {}
    queue = collections.deque()
    saved_names = {c.local_name: c.node_id for c in graph.nodes[0].children}
    compared = [n for n in set(saved_names) | set(children) if n not in skip]
    compared = sorted(n for n in compared if only is None or n in only)
    for name in compared:
        if name in saved_names and name in children:
            queue.append((saved_names[name], children[name], name))
        elif name in saved_names:
            if any(True for _ in _leaves(graph, saved_names[name], name)):
                mismatch.only_checkpoint.append(name)
        elif _any_values(children[name]):
            mismatch.only_program.append(name)
    unreached: dict[int, str] = {}
    taken: set[int] = set()  # the program objects that found a value
    while queue:
        node_id, obj, path = queue.popleft()
        if node_id in matched:
            if matched[node_id] is not obj and _has_values(obj):
                mismatch.shapes.append(
                    f"{path}: the checkpoint's value of {first_path[node_id]}, a different "
                    "variable here"
                )
            continue
        matched[node_id], first_path[node_id] = obj, path
        node = graph.nodes[node_id]
        if node.attributes:
            taken.add(id(obj))
        for attribute in node.attributes:
            if attribute.name != "VARIABLE_VALUE":
                continue
            saved, here = shapes.get(attribute.checkpoint_key), _shape(obj)
            if not _has_values(obj):
                mismatch.shapes.append(f"{path}: a value in the checkpoint, no variable here")
            elif saved is not None and here is not None and list(saved) != here:
                mismatch.shapes.append(f"{path}: {list(saved)} in the checkpoint, {here} here")
        program = _children(obj)
        for child in node.children:
            name = child.local_name
            if _skipped(obj, name):
                continue
            if name in program:
                queue.append((child.node_id, program[name], f"{path}/{name}"))
            else:
                unreached.setdefault(child.node_id, f"{path}/{name}")
    # Checkpoint values that no program object took, whichever path led to them.
    for node_id, path in unreached.items():
        for leaf_id, leaf_path in _leaves(graph, node_id, path):
            if leaf_id not in matched:
                mismatch.only_checkpoint.append(leaf_path)
                matched[leaf_id] = None  # report once
    # Program values that no checkpoint node took.
    seen: set[int] = set()
    # depth first, the models' trees before the optimizers' (which hold the same variables),
    # so that a variable is named by its place in its model
    stack = [(children[n], n) for n in compared if n in saved_names and n in children][::-1]
    while stack:
        obj, path = stack.pop()
        if id(obj) in seen:
            continue
        seen.add(id(obj))
        if _has_values(obj) and id(obj) not in taken:
            mismatch.only_program.append(_describe_path(path, obj))
        for name, child in _children(obj).items():
            if not _skipped(obj, name):
                stack.append((child, f"{path}/{name}"))
    models_first = lambda path: (not path.startswith("model_"), path)  # noqa: E731
    mismatch.only_program = sorted(dict.fromkeys(mismatch.only_program), key=models_first)
    mismatch.only_checkpoint = sorted(dict.fromkeys(mismatch.only_checkpoint), key=models_first)
    mismatch.shapes = sorted(dict.fromkeys(mismatch.shapes), key=models_first)
    return mismatch


def _describe_path(path: str, obj) -> str:
    """A program path, with the Keras variable's own path and shape when it has them."""
    keras_path = getattr(obj, "path", None)
    if isinstance(keras_path, str):
        return f"{path} ({keras_path} {_shape(obj)})"
    return path


def _any_values(obj) -> bool:
    """Whether the object or anything below it saves values."""
    seen, stack = set(), [obj]
    while stack:
        current = stack.pop()
        if id(current) in seen:
            continue
        seen.add(id(current))
        if _has_values(current):
            return True
        stack.extend(_children(current).values())
    return False


def _leaves(graph, node_id: int, path: str):
    """(node id, path) of every value under a checkpoint node (each node once)."""
    seen, stack = set(), [(node_id, path)]
    while stack:
        current, where = stack.pop()
        if current in seen:
            continue
        seen.add(current)
        node = graph.nodes[current]
        if node.attributes:
            yield current, where
        for child in node.children:
            stack.append((child.node_id, f"{where}/{child.local_name}"))


# ------------------------------------------------------------------------------------------
# Loading model weights from another run (Trainer(init_from=...)).


def load_model_weights(path: str, models: Mapping[str, keras.Model]) -> tuple[list[str], list[str]]:
    """Assigns the checkpoint's model variables that match the program's by place and shape.

    A variable is taken when the checkpoint holds a value at the same place in the model (its
    path through the layers, as TensorFlow saves it) with the same shape and dtype; everything
    else keeps its initial value. Optimizer state, the step and random state are not loaded.
    With one model on each side, they are paired whatever their names.

    Args:
        path: a checkpoint prefix (see `resolve`).
        models: the program's models by key (saved as `model_<key>`).

    Returns:
        (loaded, not loaded): descriptions of the program's variables.

    Raises:
        CheckpointError: when the checkpoint holds no model, or no variable matches.
    """
    reader = tf.train.load_checkpoint(path)
    graph = _object_graph(reader)
    shapes, dtypes = reader.get_variable_to_shape_map(), reader.get_variable_to_dtype_map()
    saved = {
        c.local_name[len("model_") :]: c.node_id
        for c in graph.nodes[0].children
        if c.local_name.startswith("model_")
    }
    if not saved:
        raise CheckpointError(f"`init_from` ({path}) holds no model.")
    if len(saved) == 1 and len(models) == 1:
        pairs = [(next(iter(models)), next(iter(saved.values())))]
    else:
        pairs = [(key, saved[key]) for key in models if key in saved]
    loaded, skipped, seen, handled = [], [], set(), set()
    for key, root in pairs:
        queue = collections.deque([(root, models[key], f"model_{key}")])
        while queue:
            node_id, obj, where = queue.popleft()
            if id(obj) in seen:
                continue
            seen.add(id(obj))
            values = [a for a in graph.nodes[node_id].attributes if a.name == "VARIABLE_VALUE"]
            if values and isinstance(obj, (tf.Variable, keras.Variable)):
                handled.add(id(obj))
                saved_key = values[0].checkpoint_key
                if list(shapes[saved_key]) == _shape(obj) and dtypes[saved_key] == tf.as_dtype(
                    obj.dtype
                ):
                    obj.assign(reader.get_tensor(saved_key))
                    loaded.append(_describe_path(where, obj))
                else:
                    skipped.append(
                        f"{_describe_path(where, obj)}: {list(shapes[saved_key])} "
                        f"{dtypes[saved_key].name} in the checkpoint"
                    )
            program = _children(obj)
            for child in graph.nodes[node_id].children:
                if child.local_name in program:
                    step = (child.node_id, program[child.local_name], f"{where}/{child.local_name}")
                    queue.append(step)
    for model in models.values():
        for variable in model.weights:
            if id(variable) not in handled:
                skipped.append(f"{variable.path} {_shape(variable)}: not in the checkpoint")
    if not loaded:
        raise CheckpointError(
            f"`init_from` ({path}): none of its model variables matches this model's by place "
            f"and shape ({len(skipped)} variables differ)."
        )
    return loaded, sorted(dict.fromkeys(skipped))


# ------------------------------------------------------------------------------------------
# The Trainer's checkpoints.


def _learning_rate(optimizer) -> float | None:
    """An optimizer's learning rate when it is a variable (None for a schedule)."""
    inner = getattr(optimizer, "inner_optimizer", optimizer)  # a LossScaleOptimizer's
    rate = getattr(inner, "_learning_rate", None)
    if not isinstance(rate, (tf.Variable, keras.Variable)):
        return None
    return float(keras.ops.convert_to_numpy(rate))


def _plain(value):
    """A JSON-friendly form of an option's value."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    return str(value)


class Checkpoints:
    """The Trainer's checkpoints: a `tf.train.CheckpointManager` with the guarantees above.

    In a multi-worker cluster every worker must take part in each save (the variables are
    synchronised by collective ops), but one writes: the others save into a scratch directory
    of their own, `<directory>/.worker-<id>`, and delete it at once, as TensorFlow's
    multi-worker guide does. Every worker restores from `directory` (a shared file system).

    Args:
        directory: where checkpoints go.
        max_to_keep: how many of the latest to keep.
        writer: whether this process writes (False on multi-worker workers but the chief).
        worker: this worker's index, naming its scratch directory.
        deferred: names of trackables whose state is created after the restore (the logging
            window, balancers, the data iterator): matched when they are restored
            (`restore_extra`, `restore_data`) or created.
        options: the run's options (hyperparameters, weight schedules, ...), recorded beside
            the checkpoints; on a resume, those that changed are noted, and a changed `seed`
            is refused.
        **trackables: what to save (models, optimizers, variables).
    """

    def __init__(
        self,
        directory: str,
        max_to_keep: int,
        *,
        writer: bool = True,
        worker: int = 0,
        deferred: Sequence[str] = (),
        options: Mapping[str, object] | None = None,
        **trackables,
    ):
        self.directory = directory
        self.max_to_keep = max_to_keep
        self._writer = writer
        self._save_dir = directory if writer else os.path.join(directory, f".worker-{worker}")
        self._checkpoint = tf.train.Checkpoint(**trackables)
        self._manager = None
        self._deferred = tuple(deferred)
        self.options = {str(k): _plain(v) for k, v in (options or {}).items()}
        self._optimizers = {
            k: t for k, t in trackables.items() if isinstance(t, keras.optimizers.Optimizer)
        }
        # The learning rates this run was given (before any restore): recorded, and compared
        # on the next run with what that one is given.
        self.given = {k: _learning_rate(o) for k, o in self._optimizers.items()}
        self.restored: str | None = None
        self.notes: list[str] = []
        self.data_error: str | None = None
        self.data_spec: str | None = None
        self._record: dict = {}
        self._data_attached = False

    # -- restoring ---------------------------------------------------------------------------

    def restore(self) -> str | None:
        """Restores the newest intact checkpoint, if any; returns its path.

        Raises:
            CheckpointError: when checkpoints exist and none is intact, when the newest intact
                one does not match the program's objects both ways, or when an option that a
                resumed run cannot honour (`seed`) changed.
        """
        found = find_checkpoints(self.directory)
        damaged, chosen = [], None
        for _, prefix in found:
            reason = damage(prefix)
            if reason is None:
                chosen = prefix
                break
            damaged.append(f"{os.path.basename(prefix)} ({reason})")
        if chosen is None:
            if damaged:
                raise CheckpointError(
                    f"`checkpoint_dir` ({self.directory}) holds checkpoints, but none can be "
                    f"restored: {'; '.join(damaged)}. Nothing was deleted: move them away, or "
                    "pass another `checkpoint_dir`, to start fresh."
                )
            return None
        for item in damaged:
            logging.warning(
                "Checkpoint %s in %s is damaged; restoring %s, the newest intact one.",
                item,
                self.directory,
                os.path.basename(chosen),
            )
        record = self._read_record()
        reader = tf.train.load_checkpoint(chosen)
        mismatch = compare(reader, _children(self._checkpoint), deferred=self._deferred)
        if mismatch:
            raise CheckpointError(self._mismatch_message(chosen, mismatch, record))
        self._refuse_fixed_changes(record)
        status = self._checkpoint.restore(chosen)
        status.expect_partial()  # the deferred objects are matched when they are created
        self.restored, self._record = chosen, record
        self._note_changes(record)
        if self._writer:
            self._repair_state(found, chosen)
        logging.info("Restored %s", chosen)
        return chosen

    def restore_extra(self, **trackables) -> None:
        """Restores trackables built after `restore` (balancers), matching them both ways.

        Raises:
            CheckpointError: when their state in the checkpoint differs from the program's.
        """
        if self.restored is None:
            return
        reader = tf.train.load_checkpoint(self.restored)
        extra = tf.train.Checkpoint(**trackables)
        mismatch = compare(reader, _children(extra), only=list(trackables))
        if mismatch:
            raise CheckpointError(self._mismatch_message(self.restored, mismatch, self._record))
        extra.read(self.restored).expect_partial()

    def restore_data(self, iterator, spec: str) -> bool:
        """Restores the training data position into `iterator` where it can carry over.

        Args:
            iterator: the new training iterator.
            spec: the structure of its batches (`repr(dataset.element_spec)`), recorded with the
                next save; batches of another structure than the checkpoint's run's (another
                batch size) cannot continue its position.

        Returns:
            Whether the position was restored; if not, the data starts from its beginning and
            a warning (and a note) says why.
        """
        self.data_spec = spec
        if self.restored is None:
            return False
        name = os.path.basename(self.restored)
        reader = tf.train.load_checkpoint(self.restored)
        if not any(k.startswith("data/") for k in reader.get_variable_to_shape_map()):
            logging.warning(
                "%s holds no data position (it was saved without one): the training data "
                "starts from its beginning.",
                name,
            )
            return False
        old = self._record.get("data")
        why = None
        if old is not None and old != spec:
            why = f"the training batches changed from {old} to {spec}"
        else:
            try:
                tf.train.Checkpoint(data=iterator).read(self.restored).expect_partial()
                return True
            except (tf.errors.OpError, ValueError, AssertionError) as error:
                why = f"it cannot be restored into this pipeline ({first_line(error)})"
        note = (
            f"the data position of {name} is not used: {why}; the training data starts from "
            "its beginning"
        )
        logging.warning("%s.", note[0].upper() + note[1:])
        self.notes.append(note)
        return False

    def _read_record(self) -> dict:
        path = os.path.join(self.directory, RUN_RECORD)
        if not tf.io.gfile.exists(path):
            return {}
        try:
            with tf.io.gfile.GFile(path) as handle:
                record = json.load(handle)
            return record if isinstance(record, dict) else {}
        except (ValueError, tf.errors.OpError) as error:
            logging.warning("Ignoring %s: %s", path, first_line(error))
            return {}

    def _changed_options(self, record: dict) -> list[tuple[str, object, object]]:
        old = record.get("options")
        if not isinstance(old, dict):
            return []
        changed = []
        for key in sorted(set(old) | set(self.options)):
            if key in _RUN_LENGTH:
                continue
            before, now = old.get(key), self.options.get(key)
            if before != now:
                changed.append((key, before, now))
        return changed

    def _mismatch_message(self, chosen: str, mismatch: Mismatch, record: dict) -> str:
        changed = self._changed_options(record)
        both = [f"{k} {a!r} -> {b!r}" for k, a, b in changed if a is not None and b is not None]
        one = len(changed) - len(both)
        since = ""
        if both or one:
            since = "; options changed since that run: " + ", ".join(both)
            if one:
                since += f"{' and ' if both else ''}{one} that only one of the runs has"
        return (
            f"`checkpoint_dir` ({self.directory}) holds a checkpoint of another program: "
            f"{os.path.basename(chosen)} does not match this one ({mismatch.describe()}{since}). "
            f"Pass another `checkpoint_dir` to start fresh, or start from its model weights on "
            f"purpose, at step 0, with `init_from`={chosen}."
        )

    def _refuse_fixed_changes(self, record: dict) -> None:
        for key, before, now in self._changed_options(record):
            if key in _FIXED and before is not None and now is not None:
                raise CheckpointError(
                    f"`{key}` changed from {before!r} to {now!r} since the run that wrote "
                    f"`checkpoint_dir` ({self.directory}), but a resumed run continues that "
                    f"run's random state: give `{key}` {before!r} again, or pass another "
                    "`checkpoint_dir` to start fresh."
                )

    def _note_changes(self, record: dict) -> None:
        """The user's learning rates win; every other changed option is noted."""
        old_rates = record.get("learning_rates")
        old_rates = old_rates if isinstance(old_rates, dict) else {}
        for key, optimizer in self._optimizers.items():
            given, restored = self.given.get(key), _learning_rate(optimizer)
            if given is None or restored is None:
                continue
            before = old_rates.get(key)
            if (before if before is not None else restored) == given:
                continue
            inner = getattr(optimizer, "inner_optimizer", optimizer)
            inner.learning_rate = given
            self.notes.append(
                f"the learning rate of phase {key.removeprefix('optimizer_')!r} is {given:g} "
                f"as given, in place of {restored:g} from the checkpoint"
            )
        for key, before, now in self._changed_options(record):
            self.notes.append(f"{key} changed from {before!r} to {now!r}")
        if self.notes:
            logging.warning(
                "Resuming from %s with changes: %s.", self.restored, "; ".join(self.notes)
            )

    def _repair_state(self, found: list[tuple[int, str]], chosen: str) -> None:
        """Rewrites TensorFlow's `checkpoint` state file when it is missing, garbled or names
        another latest checkpoint than the one restored (so the manager keeps the right ones)."""
        state = None
        try:
            state = tf.train.get_checkpoint_state(self.directory)
        except (tf.errors.OpError, ValueError):
            pass
        latest = getattr(state, "model_checkpoint_path", "") if state is not None else ""
        if state is not None and os.path.basename(latest) == os.path.basename(chosen):
            return
        number = int(os.path.basename(chosen).rsplit("-", 1)[1])
        kept = [p for n, p in sorted(found) if n <= number and tf.io.gfile.exists(p + ".index")][
            -self.max_to_keep :
        ]
        tf.compat.v1.train.update_checkpoint_state(
            self.directory, chosen, all_model_checkpoint_paths=kept
        )
        logging.warning(
            "TensorFlow's checkpoint state file in %s was %s; rewrote it from the checkpoints "
            "found (latest %s).",
            self.directory,
            "missing or unreadable" if state is None else f"naming {os.path.basename(latest)}",
            os.path.basename(chosen),
        )

    # -- saving ------------------------------------------------------------------------------

    @property
    def writer(self) -> bool:
        """Whether this process writes the checkpoints (False on multi-worker workers)."""
        return self._writer

    def prepare(self, remove_temps: bool = True) -> None:
        """Creates the directory; removes what killed saves left (when holding the lock)."""
        tf.io.gfile.makedirs(self._save_dir)
        if remove_temps or not self._writer:
            self.remove_stale_temps()

    def remove_stale_temps(self) -> list[str]:
        """Removes `ckpt-N_temp` folders of saves that never finished; returns their paths.

        Only the writer does (a multi-worker worker removes its own scratch directory), and only
        while it holds the run's lock, so that no save in progress is touched.
        """
        removed = []
        if not self._writer:
            if tf.io.gfile.isdir(self._save_dir):
                tf.io.gfile.rmtree(self._save_dir)
            return removed
        if not tf.io.gfile.isdir(self.directory):
            return removed
        for name in tf.io.gfile.listdir(self.directory):
            name = name.rstrip("/")
            if _TEMP.match(name):
                path = os.path.join(self.directory, name)
                tf.io.gfile.rmtree(path)
                removed.append(path)
        if removed:
            logging.info("Removed what unfinished saves left: %s", ", ".join(removed))
        return removed

    def save(self, step: int, data=None) -> str:
        """Saves a checkpoint numbered `step`, with the data iterator `data` if given.

        A data position that cannot be saved (a pipeline reading through Python) is dropped:
        the checkpoint is saved without it, `data_error` says why, and the caller saves without
        it from then on. A save that fails without the data too raises (a full disk).
        """
        if self._manager is None:
            self._manager = tf.train.CheckpointManager(
                self._checkpoint, self._save_dir, max_to_keep=self.max_to_keep
            )
        if data is not None and not self._data_attached:
            self._checkpoint.data = data
            self._data_attached = True
        elif data is None and self._data_attached:
            del self._checkpoint.data
            self._data_attached = False
        try:
            path = self._save_once(step)
        except (tf.errors.OpError, ValueError, TypeError) as error:
            if data is None:
                raise
            del self._checkpoint.data
            self._data_attached = False
            path = self._save_once(step)  # raises when the data position was not the cause
            self.data_error = first_line(error)
        if not self._writer:
            tf.io.gfile.rmtree(self._save_dir)
        else:
            self._write_record()
        return path

    def _save_once(self, step: int) -> str:
        counter = self._checkpoint.save_counter
        count = counter.numpy()
        try:
            return self._manager.save(checkpoint_number=step)
        except Exception:
            counter.assign(count)  # a failed save does not count
            temp = os.path.join(self._save_dir, f"{PREFIX}-{step}_temp")
            if tf.io.gfile.isdir(temp):
                tf.io.gfile.rmtree(temp)
            raise

    def _write_record(self) -> None:
        """Writes `run.json`: the learning rates and options this run was given, and the
        structure of its training batches (atomically: a crash leaves the old one)."""
        record = {
            "format": 1,
            "learning_rates": self.given,
            "options": self.options,
            "data": self.data_spec if self.data_spec is not None else self._record.get("data"),
        }
        path = os.path.join(self.directory, RUN_RECORD)
        with tf.io.gfile.GFile(path + ".tmp", "w") as handle:
            json.dump(record, handle, indent=1, sort_keys=True)
        tf.io.gfile.rename(path + ".tmp", path, overwrite=True)
