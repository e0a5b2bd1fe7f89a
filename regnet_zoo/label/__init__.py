"""regnet_zoo.label"""
