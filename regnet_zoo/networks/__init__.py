"""regnet_zoo.networks"""
