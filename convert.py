"""Convert a SmolVLM checkpoint to MLX: `python convert.py --hf-path DIR_OR_HUB_ID [-q] ...`."""

from mlx_smolvlm.convert import main

if __name__ == "__main__":
    main()
