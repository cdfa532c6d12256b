"""What `cvjax.main --help` and `--dry_run` print: a config's fields with their values and
the comments the config files give them, the nearest field to a misspelt one, and the plan of
a run (steps, epochs, images, what it writes) without training."""

import ast
import difflib
import json
import os
import re


def flatten(config, prefix=''):
  """{'train.batch_size': 128, ...} of a ConfigDict (or a dict)."""
  out = {}
  for key, value in config.items():
    if hasattr(value, 'items'):
      out.update(flatten(value, f'{prefix}{key}.'))
    else:
      out[f'{prefix}{key}'] = value
  return out


def load_config(spec):
  """get_config(arg) of `spec` = 'FILE.py[:arg]', as ml_collections' config flag loads it."""
  import importlib.util  # pylint: disable=g-import-not-at-top
  path, _, arg = spec.partition(':')
  module_spec = importlib.util.spec_from_file_location('_cvjax_config', path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(arg) if arg else module.get_config()


class _Source:
  """A config file's assignments by line, and the comment each one carries."""

  def __init__(self, path):
    import tokenize  # pylint: disable=g-import-not-at-top
    text = open(path).read()
    self.lines = text.splitlines()
    self.assigned = {}  # line -> (statement's first line, [dotted fields], value text)
    for node in ast.walk(ast.parse(text)):
      if isinstance(node, (ast.Assign, ast.AugAssign, ast.AnnAssign)):
        targets = node.targets if isinstance(node, ast.Assign) else [node.target]
        fields = [f for t in targets for f in _fields(t)]
        value = ast.get_source_segment(text, node.value) if node.value is not None else ''
        for line in range(node.lineno, node.end_lineno + 1):
          self.assigned[line] = (node.lineno, node.end_lineno, fields, value)
    self.comments = {}  # line -> its comment (the text after '#')
    with open(path) as f:
      for tok in tokenize.generate_tokens(f.readline):
        if tok.type == tokenize.COMMENT:
          self.comments[tok.start[0]] = tok.string.lstrip('#').strip()

  def comment(self, first, last):
    """The comment on the statement's lines, else the comment lines right above it."""
    inline = [self.comments[n] for n in range(first, last + 1) if n in self.comments]
    if inline:
      return ' '.join(inline)
    above, n = [], first - 1
    while n >= 1 and self.lines[n - 1].strip().startswith('#'):
      above.insert(0, self.comments.get(n, ''))
      n -= 1
    return ' '.join(a for a in above if a) or None


def _fields(target):
  """The dotted fields an assignment target sets: `c.train.batch_size` -> train.batch_size."""
  if isinstance(target, (ast.Tuple, ast.List)):
    return [f for t in target.elts for f in _fields(t)]
  parts = []
  while isinstance(target, ast.Attribute):
    parts.insert(0, target.attr)
    target = target.value
  return ['.'.join(parts)] if parts and isinstance(target, ast.Name) else []


def field_sources(spec):
  """{'section.field': (path, line, value text, comment)}: where each field of the config
  `path[:arg]` got its value, found by running its get_config and noting every assignment
  the config files (those in its folder and in configs/) execute; the last one sets the
  value. The comment is that line's, else the one where the field was first set (common.py:
  what the field is)."""
  import sys  # pylint: disable=g-import-not-at-top
  path = spec.partition(':')[0]
  folders = {os.path.dirname(os.path.realpath(path))}
  try:  # A config of one's own elsewhere that builds on configs/common.py: that one's too.
    import configs  # pylint: disable=g-import-not-at-top
    folders.update(os.path.realpath(p) for p in configs.__path__)
  except ImportError:
    pass
  sources, first, last = {}, {}, {}

  def source(filename):
    real = os.path.realpath(filename)
    if os.path.dirname(real) not in folders:
      return None
    if real not in sources:
      sources[real] = _Source(real)
    return sources[real]

  def local(frame, event, arg):
    del arg
    if event == 'line':
      src = source(frame.f_code.co_filename)
      hit = src.assigned.get(frame.f_lineno)
      if hit:
        for field in hit[2]:
          where = (os.path.realpath(frame.f_code.co_filename), *hit)
          first.setdefault(field, where)
          last[field] = where
    return local

  def tracer(frame, event, arg):
    del event, arg
    return local if source(frame.f_code.co_filename) else None

  previous = sys.gettrace()
  sys.settrace(tracer)
  try:
    load_config(spec)
  finally:
    sys.settrace(previous)
  out = {}
  for field, (file, start, end, _, value) in last.items():
    comment = sources[file].comment(start, end)
    if not comment:
      f0, s0, e0, _, _ = first[field]
      comment = sources[f0].comment(s0, e0)
    out[field] = (file, start, value, comment)
  return out


def _same(text, value):
  if text and text.startswith('config_dict.placeholder('):
    return value is None
  try:
    return ast.literal_eval(text) == value
  except (ValueError, SyntaxError):
    return False


def _value(value):
  if isinstance(value, str):
    return json.dumps(value)
  if isinstance(value, tuple):  # As the override parser reads it: (0.5, 0.75), not YAML's.
    return '(' + ', '.join(_value(v) for v in value) + (',)' if len(value) == 1 else ')')
  return str(value)


def describe(config, spec):
  """The config's fields, one a line: `--config.field=value  # comment`, the comment from the
  config file's line that set the field's value for this config (`spec`: path[:arg]). A field
  given another value since (an override) says what the file set."""
  sources = field_sources(spec) if os.path.isfile(spec.partition(':')[0]) else {}
  lines = []
  for name, value in flatten(config).items():
    text = f'  --config.{name}={_value(value)}'
    _, _, assigned, comment = sources.get(name, (None, None, None, None))
    if comment and assigned is not None and not _same(assigned, value) and _literal(assigned):
      comment = f'(the config file sets {assigned}) {comment}'
    lines.append(f'{text:<52}  # {comment}' if comment else text)
  return '\n'.join(lines)


def _literal(text):
  try:
    ast.literal_eval(text)
    return True
  except (ValueError, SyntaxError):
    return False


def nearest_field(config, name):
  """The field of `config` a misspelt `name` (e.g. 'train.learning_rate') most likely means,
  looked for anywhere in the config, or None."""
  fields = list(flatten(config))
  leaf = name.split('.')[-1]
  same_leaf = [f for f in fields if f.split('.')[-1] == leaf]
  if same_leaf:
    return same_leaf[0]
  close = difflib.get_close_matches(name, fields, n=1, cutoff=0.6)
  if close:
    return close[0]
  leaves = {f.split('.')[-1]: f for f in fields}
  close = difflib.get_close_matches(leaf, list(leaves), n=1, cutoff=0.6)
  return leaves[close[0]] if close else None


def unknown_fields(config, argv):
  """The `--config.a.b` overrides of `argv` that name no field of `config`."""
  fields = set(flatten(config))
  sections = {f.rsplit('.', 1)[0] for f in fields if '.' in f}
  out = []
  for arg in argv:
    m = re.match(r'--config\.([\w.]+)(=|$)', arg)
    if m and m.group(1) not in fields and m.group(1) not in sections:
      out.append(m.group(1))
  return out


def plan(config, workdir):
  """What the run would do, from the config and the data's size, without training."""
  # pylint: disable=g-import-not-at-top
  from cvjax.data import memory
  from cvjax import experiment
  from cvjax.errors import UserError
  # pylint: enable=g-import-not-at-top
  d, t = config.dataset, config.train
  if d.path or d.name in memory.EMBEDDED_DATASETS:
    data = memory.load(d)  # Local files: read (cached), to count them.
    num_train, num_test = len(data.train_labels), len(data.test_labels)
    where = d.path or f'{d.name}, shipped with cvjax'
  else:
    num_train, num_test = TFDS_SIZES.get(d.name, (None, None))
    where = f'tfds {d.name}' + (f' in {d.data_dir}' if d.data_dir else '')
  lines = [f'Plan for {config.model.name} on {where}:']
  if num_train is None:
    lines.append(f'  train.num_steps={t.num_steps}, train.num_epochs={t.num_epochs} of '
                 f'batches of {t.batch_size} (the dataset\'s size is known once it is read)')
  else:
    try:
      per_epoch, total = experiment.steps_for(config, num_train)
    except UserError as e:
      return f'{lines[0]}\n  cannot run: {e}'
    epochs = total / per_epoch
    every = t.eval_every_steps or per_epoch
    lines += [
        f'  {num_train:,} training and {num_test:,} test images',
        f'  {total:,} steps of {t.batch_size} images = {epochs:.4g} epochs ({per_epoch:,} steps '
        f'an epoch; {total * t.batch_size:,} training images in all)',
        f'  test evaluation every {every:,} steps ({-(-total // every):,} in all), a log line '
        f'every {t.log_every_steps:,} steps, a checkpoint '
        + (f'every {t.checkpoint_every_steps:,} steps and ' if t.checkpoint_every_steps else '')
        + 'at the end']
  from cvjax import population  # pylint: disable=g-import-not-at-top
  if population.is_population(config):
    members = population.members(config)
    lines.append(f'  a population of {len(members)} members in one program: '
                 + ', '.join(m.name for m in members))
    lines.append(f'  writes {workdir}/: checkpoints/, config.json, results.json at the end, and '
                 'for each member members/<name>/ with its config.json, metrics.jsonl, '
                 'TensorBoard events, error_analysis/ and results.json')
  else:
    lines.append(f'  writes {workdir}/: checkpoints/, config.json, metrics.jsonl and TensorBoard '
                 'events, then error_analysis/ and results.json at the end')
  done = os.path.join(workdir, 'results.json')
  if os.path.exists(done):
    lines.append(f'  {workdir} holds a finished run (results.json): a re-run trains nothing')
  elif os.path.isdir(os.path.join(workdir, 'checkpoints')):
    lines.append(f'  {workdir} holds checkpoints: the run resumes from its latest one')
  return '\n'.join(lines)


# Train / test sizes of the tfds datasets, for a plan without reading them.
TFDS_SIZES = {'mnist': (60_000, 10_000), 'fashion_mnist': (60_000, 10_000),
              'kmnist': (60_000, 10_000), 'emnist/digits': (240_000, 40_000),
              'emnist/letters': (88_800, 14_800), 'cifar10': (50_000, 10_000),
              'cifar100': (50_000, 10_000), 'svhn_cropped': (73_257, 26_032),
              'imagenet2012': (1_281_167, 50_000)}
