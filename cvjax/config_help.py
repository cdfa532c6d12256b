"""What `cvjax.main --help` and `--dry_run` print: a config's fields with their values and
the comments the config files give them, the nearest field to a misspelt one, and the plan of
a run (steps, epochs, images, what it writes) without training."""

import ast
import difflib
import glob
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


def field_comments(config_path):
  """{'section.field': [(assigned text, comment), ...]} from the config file and the config
  files next to it (a config reuses the others' get_config, so their comments apply), the
  config's own file first: the comment on the assignment's line, or the lines right above."""
  comments = {}
  folder = os.path.dirname(os.path.abspath(config_path))
  others = [p for p in sorted(glob.glob(os.path.join(folder, '*.py')))
            if not os.path.samefile(p, config_path)]
  for path in [config_path] + others:
    above = []
    for line in open(path).read().splitlines():
      stripped = line.strip()
      if stripped.startswith('#'):
        above.append(stripped.lstrip('# ').strip())
        continue
      m = re.match(r'c\.([\w.]+)\s*=\s*([^#]*?)\s*(?:#\s*(.*))?$', stripped)
      if m and (m.group(3) or above):
        comments.setdefault(m.group(1), []).append((m.group(2), m.group(3) or ' '.join(above)))
      above = []
  return comments


def _same(text, value):
  if text and text.startswith('config_dict.placeholder('):
    return value is None
  try:
    return ast.literal_eval(text) == value
  except (ValueError, SyntaxError):
    return False


def describe(config, config_path):
  """The config's fields, one a line: `--config.field=value  # comment`. A comment with
  numbers in it, written beside another value than this config's, says which."""
  comments = field_comments(config_path) if os.path.isfile(config_path) else {}
  lines = []
  for name, value in flatten(config).items():
    text = f'  --config.{name}={json.dumps(value) if isinstance(value, str) else value}'
    candidates = comments.get(name, [])
    assigned, comment = next(((a, c) for a, c in candidates if _same(a, value)),
                             candidates[0] if candidates else (None, None))
    if comment and not _same(assigned, value) and re.search(r'\d\d', comment):
      comment = f'(said of {assigned}) {comment}'  # Numbers that may not hold for this value.
    lines.append(f'{text:<52}  # {comment}' if comment else text)
  return '\n'.join(lines)


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
