"""Datasets with labels in the hierarchy's class order: synthetic, CIFAR-100, ImageFolder trees and feature files.

Nothing here unpickles a user file except the standard CIFAR-100 files, which are read with a restricted
unpickler (:class:`CifarUnpickler`); feature files are read with ``torch.load(weights_only=True)`` or
``numpy.load(allow_pickle=False)``.
"""

from .cifar import CIFAR100, CIFAR100_MEAN, CIFAR100_STD, CifarUnpickler, load_cifar_pickle, random_crop_flip
from .common import ArrayDataset, DataError, check_labels
from .factory import DATASETS, make_datasets
from .features import FeaturesDataset, load_features
from .imagefolder import ImageFolderDataset, image_folder
from .synthetic import SyntheticHierarchical

__all__ = [
    "DataError", "ArrayDataset", "SyntheticHierarchical", "CIFAR100", "CifarUnpickler", "load_cifar_pickle",
    "ImageFolderDataset", "image_folder", "load_features", "FeaturesDataset", "check_labels",
    "make_datasets", "DATASETS", "random_crop_flip", "CIFAR100_MEAN", "CIFAR100_STD",
]
