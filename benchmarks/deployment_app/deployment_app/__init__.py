"""The cifar100_resnet18 example's SplitFed app with timing marks (deployment benchmark only)."""
