"""``python -m bam_model.lm_eval_tasks`` prints the folder to give lm_eval as --include_path."""
from . import PATH

print(PATH)
