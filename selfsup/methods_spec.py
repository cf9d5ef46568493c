"""Every built-in method's name and arguments, declared without importing torch, Lightning or timm.

The CLI builds its parsers from these declarations, so ``selfsup --help``, ``selfsup pretrain --method
NAME --help`` and every argument error answer before anything heavy is imported. The declarations are
generated from the method classes themselves (their constructor chain, as
:func:`selfsup.ssl.module.method_arguments` reads it, and their ``Args:`` docstrings), so each argument is
documented once, in its class; ``tests/test_cli_lazy.py`` fails when they differ and prints what to run::

    python -m selfsup.methods_spec --write    # regenerate SPECS from the classes
    python -m selfsup.methods_spec --check    # exit 1, naming each difference, when they differ

Once the real registry (:data:`selfsup.ssl.module.METHODS`) is imported, the functions below read the
classes instead, so a method registered by a user's own code is found too.
"""

from __future__ import annotations

import inspect
import re
import sys
from pathlib import Path
from typing import Any, NamedTuple

from selfsup.errors import ConfigError


class ArgSpec(NamedTuple):
    """One constructor argument of a method: its annotation (as source text), default, and help text."""

    annotation: str
    default: Any
    help: str


# BEGIN GENERATED (python -m selfsup.methods_spec --write; do not edit by hand)
SPECS: dict[str, dict[str, ArgSpec]] = {
    'bigan': {
        'backbone': ArgSpec('str', 'cifar_resnet18', 'convnet_small (fast, for CPU tests), cifar_resnet18 (3x3 stem, no max-pool) or any timm model name, built with pretrained=False (python -c "import timm; print(timm.list_models(\'resnet*\'))" lists them).'),
        'norm': ArgSpec('str | None', None, 'backbone normalisation layer (batch, group, layer) or None for its own.'),
        'optimizer': ArgSpec('str', 'adamw', 'sgd, adamw or lars.'),
        'lr': ArgSpec('float', 0.0002, 'peak learning rate (reached after warm-up).'),
        'weight_decay': ArgSpec('float', 0.0, 'decoupled (AdamW) or L2 (SGD/LARS) weight decay.'),
        'momentum': ArgSpec('float', 0.9, 'SGD/LARS momentum.'),
        'warmup_epochs': ArgSpec('float', 0.0, 'epochs of linear warm-up (fractions allowed).'),
        'crop_scale': ArgSpec('float', 1.0, 'smallest area fraction of the random resized crop (1.0 disables cropping).'),
        'flip': ArgSpec('bool', True, 'random horizontal flips in the training augmentation.'),
        'channels_last': ArgSpec('bool', False, 'train with weights and images in channels-last memory format (faster convolutions on tensor-core GPUs with bf16-mixed or 16-mixed precision; no effect on results).'),
        'z_dim': ArgSpec('int', 128, 'latent dimension of the generator.'),
        'g_width': ArgSpec('int', 64, "channels of the generator's last hidden layer."),
        'gan_loss': ArgSpec('str', 'hinge', 'hinge (with spectral norm, the stable choice) or ns (non-saturating cross-entropy).'),
        'image_size': ArgSpec('int', 32, 'side of the generated images; follows the data.'),
        'num_samples': ArgSpec('int', 64, 'images in the sample grid written after every epoch (0: none).'),
        'd_width': ArgSpec('int', 64, "channels of the first conv of D's image branch."),
        'd_hidden': ArgSpec('int', 512, "width of D's code branch and joint MLP."),
    },
    'colorization': {
        'backbone': ArgSpec('str', 'cifar_resnet18', 'convnet_small (fast, for CPU tests), cifar_resnet18 (3x3 stem, no max-pool) or any timm model name, built with pretrained=False (python -c "import timm; print(timm.list_models(\'resnet*\'))" lists them).'),
        'norm': ArgSpec('str | None', None, 'backbone normalisation layer (batch, group, layer) or None for its own.'),
        'optimizer': ArgSpec('str', 'adamw', 'sgd, adamw or lars.'),
        'lr': ArgSpec('float', 0.002, 'peak learning rate (reached after warm-up).'),
        'weight_decay': ArgSpec('float', 0.05, 'decoupled (AdamW) or L2 (SGD/LARS) weight decay.'),
        'momentum': ArgSpec('float', 0.9, 'SGD/LARS momentum.'),
        'warmup_epochs': ArgSpec('float', 1.0, 'epochs of linear warm-up (fractions allowed).'),
        'crop_scale': ArgSpec('float', 0.5, 'smallest area fraction of the random resized crop (1.0 disables cropping).'),
        'flip': ArgSpec('bool', True, 'random horizontal flips in the training augmentation.'),
        'channels_last': ArgSpec('bool', False, 'train with weights and images in channels-last memory format (faster convolutions on tensor-core GPUs with bf16-mixed or 16-mixed precision; no effect on results).'),
        'loss': ArgSpec('str', 'ce', 'ce: classification over the in-gamut ab bins with soft targets and class rebalancing; l2: regression of ab with a mean squared error.'),
        'decoder_width': ArgSpec('int', 64, 'channels of the decoder.'),
        'out_stride': ArgSpec('int', 4, "the decoder predicts at 1/out_stride of the input resolution (the paper's 4)."),
        'rebalance': ArgSpec('float', 0.5, 'the rebalancing lambda mixing the empirical prior with a uniform one (1: no rebalancing).'),
        'temperature': ArgSpec('float', 0.38, 'annealed-mean temperature of colorize (0.38 in the paper).'),
        'grid_images': ArgSpec('int', 8, 'validation images in the PNG grid; 0 turns it off.'),
    },
    'cpc': {
        'backbone': ArgSpec('str', 'cifar_resnet18', 'convnet_small (fast, for CPU tests), cifar_resnet18 (3x3 stem, no max-pool) or any timm model name, built with pretrained=False (python -c "import timm; print(timm.list_models(\'resnet*\'))" lists them).'),
        'norm': ArgSpec('str | None', 'layer', 'backbone normalisation layer (batch, group, layer) or None for its own.'),
        'optimizer': ArgSpec('str', 'adamw', 'sgd, adamw or lars.'),
        'lr': ArgSpec('float', 0.0002, 'peak learning rate (reached after warm-up).'),
        'weight_decay': ArgSpec('float', 0.0, 'decoupled (AdamW) or L2 (SGD/LARS) weight decay.'),
        'momentum': ArgSpec('float', 0.9, 'SGD/LARS momentum.'),
        'warmup_epochs': ArgSpec('float', 1.0, 'epochs of linear warm-up (fractions allowed).'),
        'crop_scale': ArgSpec('float', 0.5, 'smallest area fraction of the random resized crop (1.0 disables cropping).'),
        'flip': ArgSpec('bool', True, 'random horizontal flips in the training augmentation.'),
        'channels_last': ArgSpec('bool', False, 'train with weights and images in channels-last memory format (faster convolutions on tensor-core GPUs with bf16-mixed or 16-mixed precision; no effect on results).'),
        'image_size': ArgSpec('int', 32, 'side of the square images the grid is cut from; training batches and evaluation images of another size are resized and centre-cropped to it first.'),
        'patch_size': ArgSpec('int | None', None, 'patch side in pixels; None picks default_patch_grid (32 px: 8).'),
        'patch_stride': ArgSpec('int | None', None, 'step between patches in pixels; None picks default_patch_grid (32 px: 4, so a 7x7 grid of half-overlapping patches).'),
        'max_offset': ArgSpec('int', 5, 'predict offsets 1..max_offset rows ahead (K linear maps).'),
        'skip_overlap': ArgSpec('bool', True, 'skip offsets k whose target patches overlap the context row (k * patch_stride < patch_size).'),
        'directions': ArgSpec('str', 'down', 'comma-separated prediction directions, from down (top to bottom), up, left, right; they share the encoder, the context network and the predictors. down alone is the default: in the CPU results table all four (as the paper) gave 44.2 linear against 44.8 for down, and took longer to train (benchmarks/results/quality_cpu_cpc_directions.json).'),
        'context_hidden': ArgSpec('int', 256, "width inside the context network's residual blocks."),
        'context_blocks': ArgSpec('int', 5, 'number of residual blocks in the context network.'),
        'target_dim': ArgSpec('int | None', 64, "targets are a linear projection of the patch vectors to this many dims (as in the paper's code); None uses the patch vectors themselves."),
        'emb_scale': ArgSpec('float', 0.1, "scale of the predictions (the paper's emb_scale)."),
        'patch_color_drop': ArgSpec('float', 1.0, 'probability that a patch gets two colour channels dropped (training only).'),
        'patch_flip': ArgSpec('float', 0.5, 'probability that a patch is flipped horizontally (training only).'),
        'chunk_size': ArgSpec('int | None', 4096, 'prediction rows per logits chunk (memory bound); None for one matmul.'),
        'gather_negatives': ArgSpec('bool', False, "under DDP, all ranks' target vectors are candidates."),
    },
    'dcgan': {
        'backbone': ArgSpec('str', 'cifar_resnet18', 'convnet_small (fast, for CPU tests), cifar_resnet18 (3x3 stem, no max-pool) or any timm model name, built with pretrained=False (python -c "import timm; print(timm.list_models(\'resnet*\'))" lists them).'),
        'norm': ArgSpec('str | None', None, 'backbone normalisation layer (batch, group, layer) or None for its own.'),
        'optimizer': ArgSpec('str', 'adamw', 'sgd, adamw or lars.'),
        'lr': ArgSpec('float', 0.0002, 'peak learning rate (reached after warm-up).'),
        'weight_decay': ArgSpec('float', 0.0, 'decoupled (AdamW) or L2 (SGD/LARS) weight decay.'),
        'momentum': ArgSpec('float', 0.9, 'SGD/LARS momentum.'),
        'warmup_epochs': ArgSpec('float', 0.0, 'epochs of linear warm-up (fractions allowed).'),
        'crop_scale': ArgSpec('float', 1.0, 'smallest area fraction of the random resized crop (1.0 disables cropping).'),
        'flip': ArgSpec('bool', True, 'random horizontal flips in the training augmentation.'),
        'channels_last': ArgSpec('bool', False, 'train with weights and images in channels-last memory format (faster convolutions on tensor-core GPUs with bf16-mixed or 16-mixed precision; no effect on results).'),
        'z_dim': ArgSpec('int', 128, 'latent dimension of the generator.'),
        'g_width': ArgSpec('int', 64, "channels of the generator's last hidden layer."),
        'gan_loss': ArgSpec('str', 'hinge', 'hinge (with spectral norm, the stable choice) or ns (non-saturating cross-entropy).'),
        'image_size': ArgSpec('int', 32, 'side of the generated images; follows the data.'),
        'num_samples': ArgSpec('int', 64, 'images in the sample grid written after every epoch (0: none).'),
        'probe_features': ArgSpec('str', 'all_layers', "all_layers (the paper's: every stage of D's backbone max-pooled to 4x4 and concatenated) or pooled (its global-average-pooled last layer); recorded in the export's config and note."),
    },
    'exemplar': {
        'backbone': ArgSpec('str', 'cifar_resnet18', 'convnet_small (fast, for CPU tests), cifar_resnet18 (3x3 stem, no max-pool) or any timm model name, built with pretrained=False (python -c "import timm; print(timm.list_models(\'resnet*\'))" lists them).'),
        'norm': ArgSpec('str | None', None, 'backbone normalisation layer (batch, group, layer) or None for its own.'),
        'optimizer': ArgSpec('str', 'sgd', 'sgd, adamw or lars.'),
        'lr': ArgSpec('float', 0.1, 'peak learning rate (reached after warm-up).'),
        'weight_decay': ArgSpec('float', 0.0005, 'decoupled (AdamW) or L2 (SGD/LARS) weight decay.'),
        'momentum': ArgSpec('float', 0.9, 'SGD/LARS momentum.'),
        'warmup_epochs': ArgSpec('float', 1.0, 'epochs of linear warm-up (fractions allowed).'),
        'crop_scale': ArgSpec('float', 1.0, 'smallest area fraction of the random resized crop (1.0 disables cropping).'),
        'flip': ArgSpec('bool', True, 'random horizontal flips in the training augmentation.'),
        'channels_last': ArgSpec('bool', False, 'train with weights and images in channels-last memory format (faster convolutions on tensor-core GPUs with bf16-mixed or 16-mixed precision; no effect on results).'),
        'copies': ArgSpec('int', 2, "augmented views per image (Kolesnikov et al.'s reference: 8); each costs a backbone pass."),
        'embed_dim': ArgSpec('int', 1000, "width of the linear embedding the loss sees (the reference's 1000)."),
        'margin': ArgSpec('float', 0.5, "triplet margin on squared distances of unit vectors (range 0 to 4; the reference's 0.5)."),
        'mining': ArgSpec('str', 'semihard', 'semihard (the closest negative farther than the positive; FaceNet, the reference) or all (the mean over every negative).'),
        'crop_min': ArgSpec('float', 0.3, "smallest area fraction of a view's random resized crop (scale and translation)."),
        'rotation': ArgSpec('float', 20.0, 'largest rotation of a view in degrees (Dosovitskiy et al.: 20).'),
        'color_jitter': ArgSpec('float', 0.4, "strength of a view's colour jitter (brightness, contrast, saturation; hue a quarter)."),
        'grayscale': ArgSpec('float', 0.0, 'probability that a view is grey (the reference: 0.66 on ImageNet).'),
        'gather_negatives': ArgSpec('bool', False, "under DDP, every rank's views are candidates (positives and negatives of the global batch); only with --norm layer or group (see the module's note on batch norm)."),
    },
    'flow': {
        'backbone': ArgSpec('str', 'convnet_small', 'unused by a flow (its encoder is the flow itself); must stay convnet_small, any other value is an error.'),
        'norm': ArgSpec('str | None', None, 'backbone normalisation layer (batch, group, layer) or None for its own.'),
        'optimizer': ArgSpec('str', 'adamw', 'sgd, adamw or lars.'),
        'lr': ArgSpec('float', 0.001, 'peak learning rate (reached after warm-up).'),
        'weight_decay': ArgSpec('float', 0.0, 'decoupled (AdamW) or L2 (SGD/LARS) weight decay.'),
        'momentum': ArgSpec('float', 0.9, 'SGD/LARS momentum.'),
        'warmup_epochs': ArgSpec('float', 1.0, 'epochs of linear warm-up (fractions allowed).'),
        'crop_scale': ArgSpec('float', 1.0, 'smallest area fraction of the random resized crop (1.0 disables cropping).'),
        'flip': ArgSpec('bool', True, 'random horizontal flips in the training augmentation.'),
        'channels_last': ArgSpec('bool', False, 'train with weights and images in channels-last memory format (faster convolutions on tensor-core GPUs with bf16-mixed or 16-mixed precision; no effect on results).'),
        'levels': ArgSpec('int', 3, 'number of scales (image sides must be divisible by 2 ** levels).'),
        'steps': ArgSpec('int', 4, 'flow steps (actnorm, 1x1 convolution, coupling) per level.'),
        'hidden': ArgSpec('int', 32, "channels of the coupling layers' convnets."),
        'dequantization': ArgSpec('str', 'uniform', 'uniform (u ~ U[0, 1)) or variational (a learned logistic-normal q(u | x), VariationalDequantizer, trained with the flow on the tighter bound E_q[log p(x + u) - log q(u | x)]).'),
        'sample_temperature': ArgSpec('float', 0.7, "temperature of the sample grid written each epoch (std of the latents relative to the prior's; 0 draws each prior's mean)."),
        'num_samples': ArgSpec('int', 64, 'images in the sample grid (0: none).'),
    },
    'jigsaw': {
        'backbone': ArgSpec('str', 'cifar_resnet18', 'convnet_small (fast, for CPU tests), cifar_resnet18 (3x3 stem, no max-pool) or any timm model name, built with pretrained=False (python -c "import timm; print(timm.list_models(\'resnet*\'))" lists them).'),
        'norm': ArgSpec('str | None', None, 'backbone normalisation layer (batch, group, layer) or None for its own.'),
        'optimizer': ArgSpec('str', 'sgd', 'sgd, adamw or lars.'),
        'lr': ArgSpec('float', 0.1, 'peak learning rate (reached after warm-up).'),
        'weight_decay': ArgSpec('float', 0.0005, 'decoupled (AdamW) or L2 (SGD/LARS) weight decay.'),
        'momentum': ArgSpec('float', 0.9, 'SGD/LARS momentum.'),
        'warmup_epochs': ArgSpec('float', 1.0, 'epochs of linear warm-up (fractions allowed).'),
        'crop_scale': ArgSpec('float', 0.5, 'smallest area fraction of the random resized crop (1.0 disables cropping).'),
        'flip': ArgSpec('bool', True, 'random horizontal flips in the training augmentation.'),
        'channels_last': ArgSpec('bool', False, 'train with weights and images in channels-last memory format (faster convolutions on tensor-core GPUs with bf16-mixed or 16-mixed precision; no effect on results).'),
        'num_permutations': ArgSpec('int', 100, 'size of the permutation set (classes), chosen far apart in Hamming distance.'),
        'permutation_selection': ArgSpec('str', 'maxmin', "maxmin (default) or mean (the paper's Algorithm 1); see permutation_set."),
        'patch_size': ArgSpec('int | None', None, 'tile side in pixels; None derives it from the image size (0.7 of a grid cell).'),
        'patch_gap': ArgSpec('int | None', None, 'smallest gap between tiles in pixels; None: 0.1 of a cell, at least 1 px.'),
        'patch_resize': ArgSpec('int | None', None, 'side tiles are resized to (bilinear) before the backbone; None: tiles under 16 px are upsampled to 16 px (MIN_TILE: at 32 px, 7 px tiles as they are learn features that are worse than random ones on whole images); 0: never resize.'),
        'tile_norm': ArgSpec('bool', True, "normalise each channel of each tile to mean 0 and std 1 on its own, so the puzzle cannot be solved from the tiles' brightness and contrast (the paper's guard; without it a logistic regression on the nine tiles' means and stds finds the permutation far above chance)."),
        'channel_jitter': ArgSpec('int | None', None, "largest shift in pixels of each colour channel of a tile, drawn per tile and channel (training only); None: 2 px per 64 px of tile, at least 1 (the paper's +-2 px of 64 px tiles); 0: off."),
        'grayscale': ArgSpec('float', 0.3, "share of training images made grey before tiling (the paper's 30 %)."),
        'color_drop': ArgSpec('float', 0.0, 'probability that a tile keeps one random colour channel only (the others faint noise); off by default, as for RelativePosition.'),
        'head_hidden': ArgSpec('int', 512, 'hidden width of the MLP on the nine concatenated tile features.'),
    },
    'multitask': {
        'backbone': ArgSpec('str', 'cifar_resnet18', 'convnet_small (fast, for CPU tests), cifar_resnet18 (3x3 stem, no max-pool) or any timm model name, built with pretrained=False (python -c "import timm; print(timm.list_models(\'resnet*\'))" lists them).'),
        'norm': ArgSpec('str | None', None, 'backbone normalisation layer (batch, group, layer) or None for its own.'),
        'optimizer': ArgSpec('str', 'sgd', 'sgd, adamw or lars.'),
        'lr': ArgSpec('float', 0.1, 'peak learning rate (reached after warm-up).'),
        'weight_decay': ArgSpec('float', 0.0005, 'decoupled (AdamW) or L2 (SGD/LARS) weight decay.'),
        'momentum': ArgSpec('float', 0.9, 'SGD/LARS momentum.'),
        'warmup_epochs': ArgSpec('float', 1.0, 'epochs of linear warm-up (fractions allowed).'),
        'crop_scale': ArgSpec('float', 0.5, 'smallest area fraction of the random resized crop (1.0 disables cropping).'),
        'flip': ArgSpec('bool', True, 'random horizontal flips in the training augmentation.'),
        'channels_last': ArgSpec('bool', False, 'train with weights and images in channels-last memory format (faster convolutions on tensor-core GPUs with bf16-mixed or 16-mixed precision; no effect on results).'),
        'tasks': ArgSpec('str', 'rotation,relative_position,jigsaw', 'comma-separated registered pretext tasks, each with its default options, e.g. rotation,relative_position,colorization. If any of them needs lightness input (colorization), the backbone is lightness-only and every task sees lightness (the paper\'s "lightness only" input); the exported encoder still takes RGB and converts it. cpc cuts its patch grid from the batch as it is (32 px: 8 px patches at stride 4), so the images must be square and at least a patch wide. CPC v2 needs a backbone without batch norm (the patches of one image share its statistics, a shortcut): with cpc on a batch-norm backbone (the default norm) a warning at the start of training says to pass --norm layer. The default stays the backbone\'s own, so that adding cpc never changes how the other tasks train.'),
        'task_weights': ArgSpec('str | None', None, 'comma-separated loss weights, one per task (e.g. 1,1,0.5); None: all 1.'),
    },
    'pixelcnn': {
        'backbone': ArgSpec('str', 'convnet_small', 'unused by a PixelCNN (its encoder is the network itself); must stay convnet_small, any other value is an error.'),
        'norm': ArgSpec('str | None', None, 'backbone normalisation layer (batch, group, layer) or None for its own.'),
        'optimizer': ArgSpec('str', 'adamw', 'sgd, adamw or lars.'),
        'lr': ArgSpec('float', 0.001, 'peak learning rate (reached after warm-up).'),
        'weight_decay': ArgSpec('float', 0.0, 'decoupled (AdamW) or L2 (SGD/LARS) weight decay.'),
        'momentum': ArgSpec('float', 0.9, 'SGD/LARS momentum.'),
        'warmup_epochs': ArgSpec('float', 1.0, 'epochs of linear warm-up (fractions allowed).'),
        'crop_scale': ArgSpec('float', 1.0, 'smallest area fraction of the random resized crop (1.0 disables cropping).'),
        'flip': ArgSpec('bool', True, 'random horizontal flips in the training augmentation.'),
        'channels_last': ArgSpec('bool', False, 'train with weights and images in channels-last memory format (faster convolutions on tensor-core GPUs with bf16-mixed or 16-mixed precision; no effect on results).'),
        'layers': ArgSpec('int', 8, 'gated layers.'),
        'hidden': ArgSpec('int', 64, 'channels of each stack (and of the features); at least 3, split in R, G, B groups.'),
        'kernel': ArgSpec('int', 3, "odd side of the gated layers' kernels (vertical (k//2+1) x k, horizontal 1 x (k//2+1))."),
        'first_kernel': ArgSpec('int', 7, "odd side of the first layer's kernel (the original PixelCNN's 7)."),
        'logistic_components': ArgSpec('int', 5, "discretised logistics in each subpixel's mixture (PixelCNN++ uses 10 per pixel)."),
        'probe_layer': ArgSpec('int', 0, 'the layer whose pooled activations are the features, 1 .. layers; 0: the middle one, ceil(layers / 2) (Chen et al. 2020 found the middle layers best).'),
        'num_samples': ArgSpec('int', 8, 'images in the sample grid written each epoch (0: none; sampling is sequential).'),
    },
    'relative_position': {
        'backbone': ArgSpec('str', 'cifar_resnet18', 'convnet_small (fast, for CPU tests), cifar_resnet18 (3x3 stem, no max-pool) or any timm model name, built with pretrained=False (python -c "import timm; print(timm.list_models(\'resnet*\'))" lists them).'),
        'norm': ArgSpec('str | None', None, 'backbone normalisation layer (batch, group, layer) or None for its own.'),
        'optimizer': ArgSpec('str', 'sgd', 'sgd, adamw or lars.'),
        'lr': ArgSpec('float', 0.1, 'peak learning rate (reached after warm-up).'),
        'weight_decay': ArgSpec('float', 0.0005, 'decoupled (AdamW) or L2 (SGD/LARS) weight decay.'),
        'momentum': ArgSpec('float', 0.9, 'SGD/LARS momentum.'),
        'warmup_epochs': ArgSpec('float', 1.0, 'epochs of linear warm-up (fractions allowed).'),
        'crop_scale': ArgSpec('float', 0.5, 'smallest area fraction of the random resized crop (1.0 disables cropping).'),
        'flip': ArgSpec('bool', True, 'random horizontal flips in the training augmentation.'),
        'channels_last': ArgSpec('bool', False, 'train with weights and images in channels-last memory format (faster convolutions on tensor-core GPUs with bf16-mixed or 16-mixed precision; no effect on results).'),
        'patch_size': ArgSpec('int | None', None, 'tile side in pixels; None derives it from the image size (0.7 of a grid cell).'),
        'patch_gap': ArgSpec('int | None', None, 'smallest gap between tiles in pixels; None: 0.1 of a cell, at least 1 px.'),
        'patch_resize': ArgSpec('int | None', None, 'side tiles are resized to (bilinear) before the backbone; None: tiles under 16 px are upsampled to 16 px (MIN_TILE: at 32 px, 7 px tiles as they are learn features that are worse than random ones on whole images); 0: never resize.'),
        'color_drop': ArgSpec('float', 0.0, "probability that a tile keeps one random colour channel only (the others faint noise): the paper's colour dropping against chromatic aberration. Off by default: at 32 px there is no chromatic aberration to hide, and with batch norm the dropped channels shift the statistics between training tiles and the full-colour images the encoder is evaluated on (300 steps on CIFAR-10, quick probe: 31.4% with 1.0 vs 37.4% with 0.0)."),
        'head_hidden': ArgSpec('int', 512, 'hidden width of the MLP on the concatenated pair features.'),
    },
    'rotation': {
        'backbone': ArgSpec('str', 'cifar_resnet18', 'convnet_small (fast, for CPU tests), cifar_resnet18 (3x3 stem, no max-pool) or any timm model name, built with pretrained=False (python -c "import timm; print(timm.list_models(\'resnet*\'))" lists them).'),
        'norm': ArgSpec('str | None', None, 'backbone normalisation layer (batch, group, layer) or None for its own.'),
        'optimizer': ArgSpec('str', 'sgd', 'sgd, adamw or lars.'),
        'lr': ArgSpec('float', 0.1, 'peak learning rate (reached after warm-up).'),
        'weight_decay': ArgSpec('float', 0.0005, 'decoupled (AdamW) or L2 (SGD/LARS) weight decay.'),
        'momentum': ArgSpec('float', 0.9, 'SGD/LARS momentum.'),
        'warmup_epochs': ArgSpec('float', 1.0, 'epochs of linear warm-up (fractions allowed).'),
        'crop_scale': ArgSpec('float', 0.5, 'smallest area fraction of the random resized crop (1.0 disables cropping).'),
        'flip': ArgSpec('bool', True, 'random horizontal flips in the training augmentation.'),
        'channels_last': ArgSpec('bool', False, 'train with weights and images in channels-last memory format (faster convolutions on tensor-core GPUs with bf16-mixed or 16-mixed precision; no effect on results).'),
        'head_hidden': ArgSpec('int', 0, 'hidden width of the rotation head; 0 for a linear head.'),
    },
    'vae': {
        'backbone': ArgSpec('str', 'cifar_resnet18', 'convnet_small (fast, for CPU tests), cifar_resnet18 (3x3 stem, no max-pool) or any timm model name, built with pretrained=False (python -c "import timm; print(timm.list_models(\'resnet*\'))" lists them).'),
        'norm': ArgSpec('str | None', None, 'backbone normalisation layer (batch, group, layer) or None for its own.'),
        'optimizer': ArgSpec('str', 'adamw', 'sgd, adamw or lars.'),
        'lr': ArgSpec('float', 0.001, 'peak learning rate (reached after warm-up).'),
        'weight_decay': ArgSpec('float', 0.0005, 'decoupled (AdamW) or L2 (SGD/LARS) weight decay.'),
        'momentum': ArgSpec('float', 0.9, 'SGD/LARS momentum.'),
        'warmup_epochs': ArgSpec('float', 1.0, 'epochs of linear warm-up (fractions allowed).'),
        'crop_scale': ArgSpec('float', 1.0, 'smallest area fraction of the random resized crop (1.0 disables cropping).'),
        'flip': ArgSpec('bool', True, 'random horizontal flips in the training augmentation.'),
        'channels_last': ArgSpec('bool', False, 'train with weights and images in channels-last memory format (faster convolutions on tensor-core GPUs with bf16-mixed or 16-mixed precision; no effect on results).'),
        'latent_dim': ArgSpec('int', 128, 'size of z.'),
        'beta': ArgSpec('float', 1.0, 'weight of the KL term in the training loss (1: the ELBO; validation always reports beta = 1).'),
        'likelihood': ArgSpec('str', 'logistic', 'image likelihood, logistic (discretised logistic over 256 values, bits/dim comparable to published 8-bit numbers) or bernoulli (images binarised at 1/2).'),
        'logistic_components': ArgSpec('int', 1, 'discretised logistics in the per-subpixel mixture (1: a single logistic).'),
        'decoder_width': ArgSpec('int', 32, "channels of the decoder's last (full-resolution) stage; earlier stages double it."),
        'probe_features': ArgSpec('str', 'mean', "what the exported encoder gives: mean (posterior mean of z) or backbone (the pooled backbone features); recorded in the export's config."),
        'image_size': ArgSpec('int', 32, 'side of the images the decoder generates; set from the data by selfsup pretrain.'),
    },
}
# END GENERATED


def _registry() -> dict | None:
    """The real registry when it is imported already (it then has every method, a user's own too), else None."""
    module = sys.modules.get("selfsup.ssl.module")
    return getattr(module, "METHODS", None)


def method_names() -> list[str]:
    """The registered methods' names, sorted (what ``selfsup pretrain --method`` takes)."""
    registry = _registry()
    return sorted(registry if registry is not None else SPECS)


def method_spec(method: str) -> dict[str, ArgSpec]:
    """``method``'s arguments by name, base arguments first, with the method's own defaults and help texts.

    Raises:
        ConfigError: an unknown method, with the closest known name.
    """
    registry = _registry()
    if registry is not None and method in registry:
        return spec_of_class(registry[method])
    if isinstance(method, str) and method in SPECS:
        return dict(SPECS[method])
    from selfsup.config import unknown_name_message

    raise ConfigError(unknown_name_message("method", method, method_names()))


def method_arguments(method: str) -> dict[str, inspect.Parameter]:
    """Every constructor argument of a registered method's class chain, by name, with its defaults.

    The same as :func:`selfsup.ssl.module.method_arguments` of the method's class (annotations as source
    text), read from :data:`SPECS` while the classes are not imported.
    """
    return {name: inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=a.default, annotation=a.annotation)
            for name, a in method_spec(method).items()}


# --------------------------------------------------------------------------------------------------
# Reading the classes (imports them) and writing SPECS
# --------------------------------------------------------------------------------------------------


def arg_docs(cls) -> dict[str, str]:
    """Argument descriptions from the Google-style ``Args:`` sections of ``cls`` and its bases."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        lines = (inspect.getdoc(klass) or "").splitlines() if "__doc__" in vars(klass) else []
        if "Args:" not in lines:
            continue
        entries: list[tuple[list[str], str]] = []
        for line in lines[lines.index("Args:") + 1 :]:
            if line and not line.startswith(" "):
                break
            m = re.match(r"^    (\w[\w, ]*):\s*(.*)$", line)
            if m:
                entries.append(([n.strip() for n in m.group(1).split(",")], m.group(2)))
            elif entries and line.strip():
                entries[-1] = (entries[-1][0], f"{entries[-1][1]} {line.strip()}".strip())
        for names, text in entries:
            if not text.startswith("see "):  # "lr, ...: see SSLModule" keeps the base's words
                text = re.sub(r":\w+:`~?(?:[\w.]+\.)?(\w+)`", r"\1", text.replace("``", ""))
                docs.update(dict.fromkeys(names, text))
    return docs


def spec_of_class(cls) -> dict[str, ArgSpec]:
    """A method class's :class:`ArgSpec` per argument, read from its signature chain and docstrings."""
    from selfsup.ssl.module import method_arguments as class_arguments

    docs = arg_docs(cls)
    out = {}
    for name, p in class_arguments(cls).items():
        annotation = p.annotation if isinstance(p.annotation, str) else inspect.formatannotation(p.annotation)
        out[name] = ArgSpec(annotation, p.default, docs.get(name, ""))
    return out


def specs_from_classes() -> dict[str, dict[str, ArgSpec]]:
    """What :data:`SPECS` should be: every registered method's :func:`spec_of_class` (imports them all)."""
    from selfsup.ssl.module import METHODS

    return {name: spec_of_class(METHODS[name]) for name in sorted(METHODS)}


def render(specs: dict[str, dict[str, ArgSpec]]) -> str:
    """The generated block of this file for ``specs``: one line per argument, methods sorted."""
    lines = ["SPECS: dict[str, dict[str, ArgSpec]] = {"]
    for method in sorted(specs):
        lines.append(f"    {method!r}: {{")
        for name, a in specs[method].items():
            lines.append(f"        {name!r}: ArgSpec({a.annotation!r}, {a.default!r}, {a.help!r}),")
        lines.append("    },")
    lines.append("}")
    return "\n".join(lines) + "\n"


def differences(actual: dict[str, dict[str, ArgSpec]], declared: dict[str, dict[str, ArgSpec]]) -> list[str]:
    """One line per way ``declared`` (:data:`SPECS`) differs from ``actual`` (the classes), naming what to add."""
    out = []
    for method in sorted(set(actual) | set(declared)):
        if method not in declared:
            entry = "\n".join(render({method: actual[method]}).splitlines()[1:-1])
            out.append(f"method {method!r} is registered but has no entry in SPECS; add it:\n{entry}")
            continue
        if method not in actual:
            out.append(f"SPECS declares method {method!r}, which no class registers; remove its entry")
            continue
        found = []
        for name, a in actual[method].items():
            if name not in declared[method]:
                found.append(f"{method}: argument {name!r} has no spec; add to SPECS[{method!r}]:\n"
                             f"        {name!r}: ArgSpec({a.annotation!r}, {a.default!r}, {a.help!r}),")
            elif declared[method][name] != a:
                found.append(f"{method}.{name}: SPECS says {tuple(declared[method][name])!r}, the class "
                             f"{tuple(a)!r}")
        found += [f"{method}: SPECS declares argument {name!r}, which the class does not take; remove it"
                  for name in declared[method] if name not in actual[method]]
        if not found and list(declared[method]) != list(actual[method]):
            found.append(f"{method}: arguments in another order than the class chain's")
        out += found
    return out


_BLOCK = re.compile(r"(# BEGIN GENERATED[^\n]*\n)(.*?)(# END GENERATED)", re.S)


def write(path: Path | None = None) -> bool:
    """Rewrite this file's generated block from the classes; True if it changed."""
    path = Path(path or __file__)
    text = path.read_text()
    new = _BLOCK.sub(lambda m: m.group(1) + render(specs_from_classes()) + m.group(3), text, count=1)
    if new != text:
        path.write_text(new)
    return new != text


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m selfsup.methods_spec", description=__doc__.split("\n\n")[0])
    parser.add_argument("--write", action="store_true", help="regenerate SPECS in this file from the classes")
    parser.add_argument("--check", action="store_true", help="exit 1 when SPECS differs from the classes")
    args = parser.parse_args(argv)
    if args.write:
        print(f"{__file__}: {'rewritten' if write() else 'already up to date'}")
        return 0
    problems = differences(specs_from_classes(), SPECS)
    for line in problems:
        print(line)
    if problems:
        print("run: python -m selfsup.methods_spec --write")
    return 1 if problems and args.check else 0


if __name__ == "__main__":
    sys.exit(main())
