"""signalcraft: hear a pump, fan or motor going bad before it fails."""

__version__ = "0.1.0"
