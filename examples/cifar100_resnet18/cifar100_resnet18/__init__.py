"""SplitFed ResNet18 on CIFAR-100 with MS-compressed activations, as a Flower App."""
