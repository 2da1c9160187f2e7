"""Pre-training as a submitit job: main_pretrain.py's flags plus the launcher's (see util/submit.py).

    python submitit_pretrain.py --nodes 4 --ngpus 8 --use_volta32 --config configs/mi_mae/pretrain_vit_base_in1k_400ep.yaml \
        --data_path /data/imagenet --output_dir runs/mi_mae_b --dry_run    # the resolved run and its cost; drop --dry_run to submit
    python submitit_pretrain.py --executor local --ngpus 2 --device cpu --model mae_vit_tiny_patch4 --input_size 32 ...
"""
import main_pretrain
from util.submit import launch

if __name__ == "__main__":
    launch(main_pretrain.get_args_parser, main_pretrain.validate_args, main_pretrain.main, "mim_pretrain",
           dry_run=main_pretrain.dry_run, whole_batch=main_pretrain.whole_batch_of)
