"""The adapters folder: one writer per expert, replacing only what mtg-train wrote, surviving a kill at any point.

Layout under OUTPUT_DIR for expert E:
  E/                  the installed adapter; its training_meta.json (written last, so its presence means complete)
                      records every file training wrote (size and SHA-256): anything else in E/ is the user's
  .E.partial/         the work folder of a run: checkpoints, run.json, and the finished adapter in adapter/
  .E.old-PID/         the previous adapter for the instant between the two renames that install a new one
  .E.lock             an OS file lock held by the run writing E (released by the kernel when the process dies)
Work and .old- folders hold WORK_MARKER (the PID that made them and why): only folders carrying it are ever
removed or renamed by recovery. Files in these shared folders are opened without following links (open_shared).

The job of each file: `files.py` opens and writes files in shared folders without following links; `records.py`
marks the folders we make and records the files we write; `lock.py` is the one-writer-per-expert lock;
`install.py` installs an adapter, recovers an interrupted install and writes eval.json; `checkpoints.py` checks
files whole before they are used.
"""

from mtg_core.outputs.checkpoints import (CHECKPOINT_FILES, checkpoint_problem, json_problem, safetensors_problem,
                                          torch_file_problem)
from mtg_core.outputs.files import (OutputError, apply_umask, is_write_failure, open_shared, read_small, replace_file,
                                    require_output_dir, require_writable_folder, umask, write_errors,
                                    write_failure_reason, write_new)
from mtg_core.outputs.install import (adapter_identity, check_replaceable, check_work_dir, install,
                                      is_complete_adapter, pending_installs, recover, recover_unlocked, work_dir,
                                      write_eval)
from mtg_core.outputs.lock import ExpertLock, lock_all, lock_for_training
from mtg_core.outputs.records import (EVAL, LEGACY_ENTRIES, LEGACY_EVAL_TMP, META, WORK_MARKER, describe_foreign,
                                      ensure_own_dir, foreign_files, is_ours, left_by_dead_process, make_work_dir,
                                      mark, marker, pid_alive, record_files)

__all__ = ["CHECKPOINT_FILES", "EVAL", "LEGACY_ENTRIES", "LEGACY_EVAL_TMP", "META", "WORK_MARKER", "ExpertLock",
           "OutputError", "adapter_identity", "apply_umask", "check_replaceable", "check_work_dir",
           "checkpoint_problem", "describe_foreign", "ensure_own_dir", "foreign_files", "install",
           "is_complete_adapter", "is_ours", "is_write_failure", "json_problem", "left_by_dead_process", "lock_all",
           "lock_for_training", "make_work_dir", "mark", "marker", "open_shared", "pending_installs", "pid_alive",
           "read_small", "record_files", "recover", "recover_unlocked", "replace_file", "require_output_dir",
           "require_writable_folder", "safetensors_problem", "torch_file_problem", "umask", "work_dir", "write_errors", "write_eval",
           "write_failure_reason", "write_new"]
