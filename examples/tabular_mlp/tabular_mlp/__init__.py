"""SplitFed MLP on a tabular data set with MS-compressed activations, as a Flower App."""
