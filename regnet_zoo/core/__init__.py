"""regnet_zoo.core"""
