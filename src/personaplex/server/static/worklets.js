// Audio worklets: microphone capture and reply playback with a jitter buffer.
// They run on the audio rendering thread; the page talks to them through their ports.

// Sends the microphone to the page in 20 ms blocks (480 samples at 24 kHz): small enough
// for low latency, large enough not to flood the port with 128-sample render quanta.
class CaptureProcessor extends AudioWorkletProcessor {
  constructor(options) {
    super();
    this.blockSize = options.processorOptions.blockSize;
    this.block = new Float32Array(this.blockSize);
    this.filled = 0;
  }

  process(inputs) {
    const channel = inputs[0] && inputs[0][0];
    if (!channel) return true;
    let offset = 0;
    while (offset < channel.length) {
      const count = Math.min(channel.length - offset, this.blockSize - this.filled);
      this.block.set(channel.subarray(offset, offset + count), this.filled);
      this.filled += count;
      offset += count;
      if (this.filled === this.blockSize) {
        this.port.postMessage(this.block);
        this.block = new Float32Array(this.blockSize);
        this.filled = 0;
      }
    }
    return true;
  }
}

// Plays the reply. It waits until `jitterSamples` are queued before starting (and again
// after running dry), so network and compute jitter does not break the sound. `drain`
// plays out a tail shorter than that (the end of a turn-based reply); `flush` drops
// everything queued (the user spoke over the reply).
class PlaybackProcessor extends AudioWorkletProcessor {
  constructor(options) {
    super();
    this.jitterSamples = options.processorOptions.jitterSamples;
    this.reportEvery = options.processorOptions.reportSamples;
    this.queue = [];
    this.queued = 0;
    this.readOffset = 0;
    this.playing = false;
    this.draining = false;
    this.underruns = 0;
    this.played = 0;
    this.sinceReport = 0;
    this.energy = 0;
    this.energySamples = 0;
    this.port.onmessage = (event) => this.onMessage(event.data);
  }

  onMessage(message) {
    if (message.type === "push") {
      this.queue.push(message.samples);
      this.queued += message.samples.length;
      this.draining = false;
    } else if (message.type === "drain") {
      this.draining = true;
    } else if (message.type === "flush") {
      this.queue = [];
      this.queued = 0;
      this.readOffset = 0;
      this.playing = false;
    }
  }

  process(_inputs, outputs) {
    const out = outputs[0][0];
    if (!this.playing && (this.queued >= this.jitterSamples || (this.draining && this.queued > 0))) {
      this.playing = true;
    }
    let written = 0;
    while (this.playing && written < out.length && this.queue.length > 0) {
      const head = this.queue[0];
      const count = Math.min(head.length - this.readOffset, out.length - written);
      out.set(head.subarray(this.readOffset, this.readOffset + count), written);
      written += count;
      this.readOffset += count;
      this.queued -= count;
      if (this.readOffset === head.length) {
        this.queue.shift();
        this.readOffset = 0;
      }
    }
    out.fill(0, written);
    if (this.playing && this.queue.length === 0) {
      this.playing = false;
      if (!this.draining && written < out.length) this.underruns += 1;
    }
    this.account(out, written);
    return true;
  }

  account(out, written) {
    this.played += written;
    for (let i = 0; i < written; i++) this.energy += out[i] * out[i];
    this.energySamples += out.length;
    this.sinceReport += out.length;
    if (this.sinceReport < this.reportEvery) return;
    this.port.postMessage({
      type: "state",
      level: Math.sqrt(this.energy / this.energySamples),
      queuedSamples: this.queued,
      playedSamples: this.played,
      underruns: this.underruns,
    });
    this.sinceReport = 0;
    this.energy = 0;
    this.energySamples = 0;
  }
}

registerProcessor("capture-processor", CaptureProcessor);
registerProcessor("playback-processor", PlaybackProcessor);
