// Ogg/Opus streams for the wire protocol, with the browser's own Opus codec (WebCodecs).
// WebCodecs gives raw Opus packets; the protocol carries Ogg pages (RFC 3533, RFC 7845),
// so this module writes and reads the Ogg framing itself.

const OPUS_GRANULE_RATE = 48000; // Ogg/Opus granule positions always count 48 kHz samples

const CRC_TABLE = (() => {
  const table = new Uint32Array(256);
  for (let byte = 0; byte < 256; byte++) {
    let crc = byte << 24;
    for (let bit = 0; bit < 8; bit++) {
      crc = crc & 0x80000000 ? (crc << 1) ^ 0x04c11db7 : crc << 1;
    }
    table[byte] = crc >>> 0;
  }
  return table;
})();

function oggCrc(bytes) {
  let crc = 0;
  for (let i = 0; i < bytes.length; i++) {
    crc = ((crc << 8) ^ CRC_TABLE[((crc >>> 24) ^ bytes[i]) & 0xff]) >>> 0;
  }
  return crc;
}

// One Ogg page holding exactly one packet.
function oggPage(packet, { granule, serial, sequence, flags }) {
  const lacing = [];
  let remaining = packet.length;
  while (remaining >= 255) {
    lacing.push(255);
    remaining -= 255;
  }
  lacing.push(remaining);
  const page = new Uint8Array(27 + lacing.length + packet.length);
  const view = new DataView(page.buffer);
  page.set([0x4f, 0x67, 0x67, 0x53]); // "OggS"
  page[4] = 0; // version
  page[5] = flags;
  view.setBigInt64(6, BigInt(granule), true);
  view.setUint32(14, serial, true);
  view.setUint32(18, sequence, true);
  page[26] = lacing.length;
  page.set(lacing, 27);
  page.set(packet, 27 + lacing.length);
  view.setUint32(22, oggCrc(page), true);
  return page;
}

function opusHead(sampleRate, preSkip) {
  const head = new Uint8Array(19);
  const view = new DataView(head.buffer);
  head.set(new TextEncoder().encode("OpusHead"));
  head[8] = 1; // version
  head[9] = 1; // channels
  view.setUint16(10, preSkip, true);
  view.setUint32(12, sampleRate, true);
  view.setInt16(16, 0, true); // output gain
  head[18] = 0; // channel mapping family 0: mono or stereo
  return head;
}

function opusTags() {
  const vendor = new TextEncoder().encode("personaplex");
  const tags = new Uint8Array(8 + 4 + vendor.length + 4);
  const view = new DataView(tags.buffer);
  tags.set(new TextEncoder().encode("OpusTags"));
  view.setUint32(8, vendor.length, true);
  tags.set(vendor, 12);
  view.setUint32(12 + vendor.length, 0, true); // no comments
  return tags;
}

// Encodes microphone blocks and hands out Ogg pages (`onPages(Uint8Array)`), one page per
// 20 ms Opus packet, the stream's two header pages first.
export class OggOpusEncoder {
  constructor(sampleRate, onPages, onError) {
    this.sampleRate = sampleRate;
    this.onPages = onPages;
    this.serial = (Math.random() * 0xffffffff) >>> 0;
    this.sequence = 0;
    this.granule = 0;
    this.timestampUs = 0;
    this.headerSent = false;
    this.encoder = new AudioEncoder({
      output: (chunk) => this.onChunk(chunk),
      error: (error) => onError(error),
    });
    this.encoder.configure({
      codec: "opus",
      sampleRate,
      numberOfChannels: 1,
      bitrate: 32000,
      opus: { frameDuration: 20000 },
    });
  }

  encode(samples) {
    const data = new AudioData({
      format: "f32",
      sampleRate: this.sampleRate,
      numberOfFrames: samples.length,
      numberOfChannels: 1,
      timestamp: this.timestampUs,
      data: samples,
    });
    this.timestampUs += (samples.length / this.sampleRate) * 1e6;
    this.encoder.encode(data);
    data.close();
  }

  onChunk(chunk) {
    if (!this.headerSent) {
      // 312 samples at 48 kHz is libopus's usual encoder delay.
      this.emit(opusHead(this.sampleRate, 312), 0, 0x02);
      this.emit(opusTags(), 0, 0);
      this.headerSent = true;
    }
    const packet = new Uint8Array(chunk.byteLength);
    chunk.copyTo(packet);
    this.granule += Math.round((chunk.duration / 1e6) * OPUS_GRANULE_RATE);
    this.emit(packet, this.granule, 0);
  }

  emit(packet, granule, flags) {
    const page = oggPage(packet, { granule, serial: this.serial, sequence: this.sequence++, flags });
    this.onPages(page);
  }

  close() {
    if (this.encoder.state !== "closed") this.encoder.close();
  }
}

// Reads Ogg pages (whole pages per message, as the server sends them), decodes the Opus
// packets and hands out PCM: `onPcm(Float32Array, sampleRate)`.
export class OggOpusDecoder {
  constructor(onPcm, onError) {
    this.onPcm = onPcm;
    this.pending = []; // parts of a packet continued on the next page
    this.packetsSeen = 0;
    this.timestampUs = 0;
    this.decoder = new AudioDecoder({
      output: (audio) => this.onAudio(audio),
      error: (error) => onError(error),
    });
    this.decoder.configure({ codec: "opus", sampleRate: OPUS_GRANULE_RATE, numberOfChannels: 1 });
  }

  push(bytes) {
    let offset = 0;
    while (offset + 27 <= bytes.length) {
      if (bytes[offset] !== 0x4f || bytes[offset + 1] !== 0x67 || bytes[offset + 2] !== 0x67 || bytes[offset + 3] !== 0x53) {
        throw new Error("server audio is not Ogg");
      }
      const segments = bytes[offset + 26];
      const lacing = bytes.subarray(offset + 27, offset + 27 + segments);
      let bodyOffset = offset + 27 + segments;
      let packetStart = bodyOffset;
      for (const size of lacing) {
        bodyOffset += size;
        if (size < 255) {
          this.pending.push(bytes.subarray(packetStart, bodyOffset));
          this.onPacket(concat(this.pending));
          this.pending = [];
          packetStart = bodyOffset;
        }
      }
      if (packetStart < bodyOffset) this.pending.push(bytes.subarray(packetStart, bodyOffset));
      offset = bodyOffset;
    }
  }

  onPacket(packet) {
    this.packetsSeen += 1;
    if (this.packetsSeen <= 2) return; // OpusHead and OpusTags
    // The TOC byte says how long the packet is; 20 ms is a fine guess for the timestamp.
    const chunk = new EncodedAudioChunk({ type: "key", timestamp: this.timestampUs, data: packet });
    this.timestampUs += 20000;
    this.decoder.decode(chunk);
  }

  onAudio(audio) {
    const samples = new Float32Array(audio.numberOfFrames);
    audio.copyTo(samples, { planeIndex: 0, format: "f32-planar" });
    const rate = audio.sampleRate;
    audio.close();
    this.onPcm(samples, rate);
  }

  close() {
    if (this.decoder.state !== "closed") this.decoder.close();
  }
}

function concat(parts) {
  if (parts.length === 1) return parts[0];
  const total = parts.reduce((sum, part) => sum + part.length, 0);
  const joined = new Uint8Array(total);
  let offset = 0;
  for (const part of parts) {
    joined.set(part, offset);
    offset += part.length;
  }
  return joined;
}

// Linear resampling of a stream, for a decoder that hands out another rate than the playback
// context's. It carries the last sample and the read position from one block to the next, so
// block edges are interpolated like the rest and no fraction of a sample is lost or repeated.
export class LinearResampler {
  constructor(fromRate, toRate) {
    this.fromRate = fromRate;
    this.step = fromRate / toRate;
    this.position = 0; // of the next output sample, in input samples from this block's start
    this.last = 0; // the previous block's last sample (position -1)
  }

  process(samples) {
    if (this.step === 1) return samples;
    const count = Math.max(0, Math.floor((samples.length - 1 - this.position) / this.step) + 1);
    const out = new Float32Array(count);
    for (let i = 0; i < count; i++) {
      const position = this.position + i * this.step;
      const index = Math.floor(position);
      const fraction = position - index;
      const left = index < 0 ? this.last : samples[index];
      const right = index + 1 < samples.length ? samples[index + 1] : left;
      out[i] = left * (1 - fraction) + right * fraction;
    }
    this.position += count * this.step - samples.length;
    if (samples.length) this.last = samples[samples.length - 1];
    return out;
  }
}
