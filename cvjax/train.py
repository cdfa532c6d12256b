"""The training loop: `train_and_evaluate` trains a config in a workdir, resuming from its
latest checkpoint, logging and evaluating as it goes, and writes the results at the end.

What it runs is built elsewhere: the experiment from the config (cvjax/experiment.py), the
jitted steps (cvjax/jit_steps.py, cvjax/steps.py), the speed and the progress line
(cvjax/progress.py), the metrics and results (cvjax/metric_writer.py, cvjax/results.py)."""

import time

from absl import logging
from etils import epath
import jax
from jax.sharding import NamedSharding, PartitionSpec as P
import numpy as np

from cvjax import checkpointing
from cvjax import config_checks
from cvjax import config_history
from cvjax import experiment
from cvjax import jit_steps
from cvjax import memory_estimate
from cvjax import metric_writer
from cvjax import population
from cvjax import preemption
from cvjax import progress
from cvjax import results as results_lib
from cvjax import run_lock
from cvjax import sharding as sharding_lib
from cvjax import shipped
from cvjax import steps
from cvjax.cluster import distributed
from cvjax.errors import UserError


def train_and_evaluate(config, workdir, *, devices=None):
  """Trains `config` in `workdir`, resuming from its latest checkpoint; returns
  (final train state, final test metrics: a population's by member). Raises
  preemption.Preempted, after saving a checkpoint, when SIGTERM or SIGINT asked the run to
  stop."""
  run_dir = epath.Path(workdir)  # A local path or gs://... (any etils.epath path).
  if run_dir.exists() and not run_dir.is_dir():
    raise UserError(f'--workdir={workdir} exists and is not a directory.')
  if shipped.is_shipped(workdir):
    raise UserError(f'--workdir={workdir} holds the shipped weights of a finished run, without '
                    'its optimizer state: evaluate them with `python -m cvjax.evaluate '
                    f'--workdir={workdir} --data=...`; to train, use a new --workdir.')
  if jax.process_index() == 0:
    run_lock.check_creatable(workdir)
  with preemption.watch() as stop_requested:  # Also while the data loads: ~10 s on ImageNet.
    logging.info('Reading the data and building %s (a first run decodes the images).',
                 config.model.name)  # Else a CPU run says nothing for a minute or two.
    exp = experiment.build(config, devices)  # Checks the config and the data; writes nothing.
    config_checks.warn_unmeasured(exp.config)
    memory_estimate.check(exp)  # Logs the memory it needs; refuses what clearly cannot fit.
    stopped = stop_requested(0)
    if stopped:
      raise preemption.Preempted(0, stopped)
    with run_lock.hold(workdir), checkpointing.saves_finished():
      return train_loop(exp, workdir, stop_requested)


def train_states(state):
  """[TrainState]: one run's, or a population's groups' (each with a member axis)."""
  return jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, steps.TrainState))


def current_step(state):
  counters = [x.step for x in train_states(state)]
  return int(max(np.max(x) for x in distributed.host_values(counters)))


def data_seeds(exp):
  """The seeds of the data orders the train step draws (`Input.train_batches`): one run's; a
  population's by group, one per member, each member seeing the data as it would alone."""
  return population.per_member(exp, lambda config: config.seed)


def place_batch(exp, taken):
  """The train step's batch argument for the steps of `taken` (each one's batch, from
  `Input.train_batches`): stacked on a leading axis when there are several, and placed as the
  step wants it (`population.batch_axes`). Streamed batches arrive placed so and stay as they
  are."""
  sharding = NamedSharding(exp.mesh, P(*(None,) * (len(taken) > 1), *population.batch_axes(exp)))
  batch = taken[0] if len(taken) == 1 else population.stack(taken)
  return jax.tree.map(lambda x: jax.device_put(x, sharding), batch)


def _log_start(exp, sharding):
  config = exp.config
  _, first = next(iter(exp.member_configs().values()))  # One run, or the first group.
  num_params = sum(x.size for x in jax.tree.leaves(first.abstract_state.params))
  logging.info('%s: %d parameters, %d train / %d test examples %s (%s input), %d classes, '
               '%d steps (%d per epoch), %d device(s) in %d process(es).', config.model.name,
               num_params, exp.input.num_train, exp.input.num_test, exp.input.image_shape,
               exp.input.pipeline, exp.input.num_classes, exp.total_steps, exp.steps_per_epoch,
               exp.mesh.size, jax.process_count())
  if exp.population:
    logging.info('A population of %d members in %d group(s), %s: %s.', len(exp.members),
                 len(exp.groups), 'members split over the devices'
                 if population.member_sharding(exp) else "each member's batch split over the "
                 'devices', ', '.join(m.name for m in exp.members))
  else:
    logging.info('%s.', sharding_lib.describe(exp.abstract_state, sharding, exp.mesh))


def open_writers(exp, workdir, start_step):
  """The metric writer of the run, or of each member of a population, resumed at
  `start_step`; the main process first writes each one's config.json."""
  dirs = exp.member_dirs(workdir)
  if jax.process_index() == 0:  # config.json, and config_history.jsonl at a changed resume.
    config_history.write_config(workdir, exp.config, start_step)
    for m in exp.members:
      dirs[m.name].mkdir(parents=True, exist_ok=True)
      config_history.write_config(dirs[m.name], m.config, start_step)
  return {name: metric_writer.create(d, resume_step=start_step) for name, d in dirs.items()}


def restore_or_init(exp, workdir, sharding, init_rng):
  """(checkpoint manager, train state): the newest checkpoint that restores, or a new state
  built in place. The logs a resume will extend are read first: a damaged one stops the run
  before anything is written."""
  for d in exp.member_dirs(workdir).values():
    metric_writer.read_records(d)
  epath.Path(workdir).mkdir(parents=True, exist_ok=True)
  checkpointing.check_shared_workdir(workdir)
  mngr = checkpointing.manager(workdir, exp.config.train.keep_checkpoints)
  state = checkpointing.restore_latest(
      mngr, checkpointing.abstract_with_sharding(exp.abstract_state, sharding), exp.fingerprint)
  if state is None:
    logging.info('Initialising the parameters (compiling the initialiser%s).',
                 f' of {len(exp.members)} members' if exp.population else '')
  return mngr, steps.init_state(exp.init, init_rng, sharding) if state is None else state


def train_loop(exp: experiment.Experiment, workdir, stop_requested):
  """The loop of `train_and_evaluate`, once the experiment is built and the workdir locked."""
  t = exp.config.train
  sharding = jit_steps.state_sharding(exp)
  init_rng, train_rng = exp.rngs()
  mngr, state = restore_or_init(exp, workdir, sharding, init_rng)
  start_step = current_step(state)
  if start_step >= exp.total_steps:
    finished = results_lib.read_finished(workdir, exp, start_step)
    if finished is not None:
      return state, finished
  elif start_step:
    logging.info('Resuming from the checkpoint at step %d.', start_step)
  t_start = time.perf_counter()
  writers = open_writers(exp, workdir, start_step)
  schedules = {name: g.schedule for name, (_, g) in exp.member_configs().items()}
  _log_start(exp, sharding)

  # --- Data on the device, and the jitted steps. ---
  device_data = jax.device_put(exp.input.train_data, NamedSharding(exp.mesh, P()))
  batches = exp.input.train_batches(start_step, data_seeds(exp))  # Each step's, in order.
  train_steps = {}  # Jitted, by the number of steps a call takes.
  eval_step, test_data = jit_steps.jit_evaluation(exp)
  grad_norm_every = t.grad_norm_every_steps
  if grad_norm_every:
    grad_norms = jit_steps.jit_grad_norms(exp)
  accumulate = jax.jit(steps.accumulate)

  def evaluate_all(state):
    """(test metrics, top-5 predictions, confidence), of the moving average too."""
    metrics, predictions, confidence = evaluate(eval_step, state, test_data,
                                                exp.input.eval_batches(), exp.input.num_test,
                                                exp.input.num_classes)
    metrics.update(evaluate_ema(eval_step, state, test_data, exp.input))
    return metrics, predictions, confidence

  # --- The loop. ---
  log_every, ckpt_every = t.log_every_steps, t.checkpoint_every_steps
  eval_every = t.eval_every_steps or exp.steps_per_epoch
  skip_nonfinite = t.skip_nonfinite
  chrono = progress.Chrono(exp.total_steps, t.batch_size * (len(exp.members) or 1))
  acc, evaluation, saved = None, None, [start_step]

  def save(done, state, acc):
    if saved[-1] == done:
      return
    if acc is not None and not skip_nonfinite:
      check_finite(acc, mngr)
    with chrono.paused():
      checkpointing.save(mngr, done, state, exp.fingerprint)
      for w in writers.values():
        w.sync()  # Logs up to here reach a remote workdir with each checkpoint.
    saved.append(done)

  # Each call trains up to train.steps_per_call steps, and stops at the next step that logs,
  # evaluates, checkpoints or measures gradients, so those happen at the same steps whatever
  # steps_per_call is.
  events = [e for e in (log_every, eval_every, ckpt_every, grad_norm_every) if e]
  in_flight, done = None, start_step
  while done < exp.total_steps:
    step = done
    k = min([t.steps_per_call, exp.total_steps - step] + [e - step % e for e in events])
    with chrono.waiting_for_input():
      taken = [next(batches) for _ in range(k)]  # Steps step .. step + k - 1.
      batch = place_batch(exp, taken)
    if grad_norm_every and step % grad_norm_every == 0:  # The gradient this step will take.
      first = batch if k == 1 else place_batch(exp, taken[:1])
      norms = jax.device_get(grad_norms(state, device_data, first, train_rng))
      for name, n in exp.by_member_of_groups(norms).items():
        writers[name].write_scalars(step, n)
    if k not in train_steps:
      logging.info('Compiling the train step%s; the first call waits for it (seconds to a '
                   'minute on a CPU).', f' ({k} steps per call)' if k > 1 else '')
      train_steps[k] = jit_steps.compile_train_step(exp, k)
    state, metrics = train_steps[k](state, device_data, batch, train_rng)
    acc = metrics if acc is None else accumulate(acc, metrics)
    done = step + k
    # At most two steps in flight: the host waits for the previous one after dispatching
    # this one, so a signal stops the run within a step or two (not a queue of them).
    if in_flight is not None:
      jax.block_until_ready(in_flight)
    in_flight = metrics['count']
    if not chrono.started:  # Compilation and the first step: kept out of images/s.
      jax.block_until_ready(state)
      chrono.start(done)
      logging.info('First step (with compilation) done.')

    log_now = done % log_every == 0 or done == exp.total_steps
    eval_now = done % eval_every == 0 or done == exp.total_steps
    if (log_now or eval_now) and not skip_nonfinite:
      check_finite(acc, mngr)  # A non-finite state is never logged, evaluated or saved.
    if log_now:  # The only host pull of train metrics: once per log.
      log_train(exp, done, distributed.host_values(acc), chrono.lap(done), schedules, writers,
                skip_nonfinite)
      acc = None
    if done == exp.total_steps:  # Saved before the final evaluation: a stop there loses nothing.
      save(done, state, acc)
      mngr.wait_until_finished()
      logging.info('Saved the final checkpoint (step %d).', done)
    if eval_now:
      with chrono.paused():
        evaluation = evaluate_all(state)
        log_test(exp, done, evaluation[0], writers)

    stop = stop_requested(done)  # SIGTERM or SIGINT: save this step and stop.
    if (ckpt_every and done % ckpt_every == 0) or stop:
      save(done, state, acc)
    if stop and done < exp.total_steps:
      logging.warning('Stopping after step %d (%s): its checkpoint is saved.', done, stop)
      mngr.wait_until_finished()
      for w in writers.values():
        w.close()
      raise preemption.Preempted(done, stop)

  batches.close()  # Stops the streaming workers.
  mngr.wait_until_finished()
  if evaluation is None:  # Nothing left to train: evaluate the restored state.
    logging.info('The checkpoint at step %d is the last of this run; evaluating it.', done)
    evaluation = evaluate_all(state)
  return state, finish(exp, workdir, done, evaluation, writers, time.perf_counter() - t_start)


def finish(exp, workdir, step, evaluation, writers, seconds):
  """Writes the results (the main process), closes the writers; returns the test metrics
  (a population's by member)."""
  test_metrics, predictions, confidence = evaluation
  if jax.process_index() == 0:
    results = results_lib.write(workdir, exp, step, test_metrics, predictions, confidence,
                                writers)
    logging.info('%s', results_lib.summary_line(
        results, workdir, f'Finished {exp.config.model.name} at step {step} in '
        f'{progress.fmt_time(seconds)}'))
  for w in writers.values():
    w.close()
  by_member = exp.by_member({k: np.asarray(v) for k, v in test_metrics.items()})
  final = {name: {k: float(v) for k, v in m.items()} for name, m in by_member.items()}
  return final[None] if not exp.population else final


def log_test(exp, step, test_metrics, writers):
  """Writes each member's test metrics, and the test line of the log."""
  logged = exp.by_member(test_metrics)
  for name, m in logged.items():
    writers[name].write_scalars(step, m)
  logging.info('step %d/%d  test %s', step, exp.total_steps,
               progress.metrics_text(logged, 'test', exp.nets()))


def log_train(exp, step, sums, lap, schedules, writers, skip_nonfinite):
  """Writes each member's train metrics since the last log, and the progress line."""
  rate, wait, left = lap
  logged = {}
  for name, m in exp.by_member(sums).items():
    count = m['count'] or np.nan  # 0 when train.skip_nonfinite skipped every step.
    logged[name] = {'train/loss': m['loss'] / count, 'train/error': m['errors'] / count,
                    'train/learning_rate': float(schedules[name](step - 1)),
                    'train/images_per_second': rate, 'train/input_wait_fraction': wait}
    if skip_nonfinite:
      logged[name]['train/skipped_nonfinite'] = m['nonfinite']
    writers[name].write_scalars(step, logged[name])
  logging.info('step %d/%d  %s  lr %.4g  %.0f img/s  input wait %.0f%%  ETA %s', step,
               exp.total_steps, progress.metrics_text(logged, 'train', exp.nets()),
               next(iter(logged.values()))['train/learning_rate'], rate, 100 * wait,
               progress.fmt_time(left))


EVAL_PROGRESS_EVERY_S = 5.0


def evaluate(eval_step, state, test_data, batches, num_test, num_classes,
             progress_every_s=EVAL_PROGRESS_EVERY_S):
  """Test metrics over every example exactly once (the padding is masked out; a population's:
  one value per member), the top-5
  predictions for each test example ([examples, 5], best first; `batches` from
  `Input.eval_batches()`), and each example's probability for its top class. Logs the images
  done and their rate every `progress_every_s` seconds (an evaluation of a large net on a CPU
  takes minutes)."""
  outs, last_note, last_done = [], time.perf_counter(), 0
  for batch in batches:
    outs.append(eval_step(state, test_data, batch))
    if len(outs) > 1:  # One batch in flight: the host keeps pace with the device, so it can tell.
      jax.block_until_ready(outs[-2][0]['count'])
    if len(outs) > 1 and time.perf_counter() - last_note >= progress_every_s:
      done = int(sum(np.ravel(c)[0] for c in jax.device_get([o[0]['count'] for o in outs[:-1]])))
      now = time.perf_counter()
      logging.info('evaluating: %d/%d test images, %.0f img/s', done, num_test,
                   (done - last_done) / (now - last_note))
      last_note, last_done = now, done
  sums, predictions = jax.device_get(([o[0] for o in outs], [o[1][0] for o in outs]))
  # A population's outputs have a leading member axis: examples are the second-last axis.
  confidence = np.concatenate(jax.device_get([o[1][1] for o in outs]), axis=-1)[..., :num_test]
  sums = jax.tree.map(lambda *x: sum(x), *sums)
  out = {'test/loss': sums['loss'] / sums['count'], 'test/error': sums['errors'] / sums['count'],
         'test/count': sums['count']}
  if num_classes > 5:
    out['test/top5_error'] = sums['top5_errors'] / sums['count']
  return out, np.concatenate(predictions, axis=-2)[..., :num_test, :], confidence


def evaluate_ema(eval_step, state, test_data, inp):
  """`test/ema_loss`, `test/ema_error` (and `test/ema_top5_error`) of the moving average of
  the weights (a population's: by group, as `evaluate`); {} for a state without one."""
  if any(st.ema is None for st in train_states(state)):  # Members have one or none alike.
    return {}
  ema_state = jax.tree.map(steps.with_ema_weights, state,
                           is_leaf=lambda x: isinstance(x, steps.TrainState))
  metrics, _, _ = evaluate(eval_step, ema_state, test_data, inp.eval_batches(), inp.num_test,
                           inp.num_classes)
  return {f'test/ema_{k[len("test/"):]}': v for k, v in metrics.items() if k != 'test/count'}


def check_finite(acc, mngr):
  """Stops the run when a step since the last check was non-finite, naming the first one;
  the state is then never saved, so the newest checkpoint stays the last good one."""
  count, first = distributed.host_values((acc['nonfinite'], acc['first_nonfinite']))
  count, first = int(np.sum(count)), int(np.min(first))  # A population's: over its members.
  if count:
    mngr.wait_until_finished()
    last = mngr.latest_step()
    raise UserError(
        f'the training loss or gradients became non-finite (nan or inf) at step {first}, and '
        f'the run stopped there without saving that state. '
        + (f'The newest checkpoint (step {last}) is good; a re-run resumes from it. ' if last
           else 'No checkpoint was saved before it; a re-run starts over. ')
        + 'Try a lower optimizer.learning_rate, or train.skip_nonfinite=True to skip such '
        'updates.')
