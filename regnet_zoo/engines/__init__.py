"""regnet_zoo.engines"""
