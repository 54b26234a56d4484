"""Standard evaluation: the lmms-eval model plugin (lmms_plugin.py, registered under the entry-point
group `lmms_eval.models` as `visor`), the checkpoint loading it uses (checkpoints.py) and the offline
task over the generated validation shards (offline_task.py, tasks/visor_offline/)."""
