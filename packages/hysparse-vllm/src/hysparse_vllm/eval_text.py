"""A built-in English text for perplexity checks (written for this package; no data download).

It is long enough (about a thousand tokens for a Llama-family tokenizer) that a 64-token block
selection with a small top-k actually drops context.
"""

EVAL_TEXT = """\
The lighthouse on the northern cape was built in the spring of a year that the village still \
argues about. The records say one thing, the keeper's diary says another, and the oldest \
fisherman in the harbour says that both are wrong because his grandfather carried the stones. \
What nobody disputes is that the tower was built of grey granite cut from the quarry behind the \
church, that it took two summers to finish, and that the first light was lit on a cold evening \
in October when the wind came hard from the west.

For the first forty years the light was an oil lamp with a ring of polished reflectors. The \
keeper climbed the spiral stairs every evening at sunset, trimmed the wick, cleaned the soot \
from the glass, and wound the clockwork that turned the reflectors so that ships far out at \
sea would see a flash every ten seconds. The diary records each night in the same careful hand: \
the time of lighting, the state of the weather, the ships that passed, and the time the lamp was \
put out at dawn. On stormy nights the entries are short. On calm nights the keeper sometimes \
wrote about the birds that struck the glass, or about the price of oil, or about his daughter, \
who learned to read by copying the weather reports into a second book.

In the winter of the great storm, a cargo ship lost its rudder south of the cape. The diary \
says that the keeper saw its lights drifting toward the rocks a little after midnight, and that \
he rang the bell in the gallery until the men of the village came down to the shore with ropes \
and lanterns. They could not launch a boat into that sea. Instead they built a fire on the \
beach so that the crew would know where the sand began, and at first light the ship grounded on \
the sand rather than on the rocks. Every sailor walked ashore. The ship's bell still hangs in \
the church, and every year on the anniversary the children ring it once for each man who was \
saved.

Later the oil lamp was replaced by a paraffin burner, which was brighter and needed less \
cleaning, and later still by an electric lamp fed by a cable that ran along the road from the \
town. Each change made the keeper's work lighter, and each change made the village a little \
less sure that a keeper was needed at all. When the light was finally made automatic, the last \
keeper locked the door, handed the key to the harbour master, and moved into a small house \
near the school, where he taught the children knots, tides and the names of the stars.

Today the tower is a museum for half of the year. Visitors climb the same stairs, stand in the \
gallery where the bell once hung, and look out at the water. The guide tells them about the \
storm and the fire on the beach, about the daughter who copied the weather, and about the \
argument over the year the tower was built. Some visitors ask why the light still turns when \
ships now carry satellite receivers that know their position to within a few metres. The guide \
answers that instruments fail, that batteries run flat, and that a sailor who has lost \
everything else can still count the seconds between two flashes and know exactly where he is.

At night, when the museum is closed, the lamp comes on by itself at sunset and goes out by \
itself at dawn. Nobody climbs the stairs, nobody trims a wick, and nobody writes in the diary. \
But the fishermen say that on cold evenings in October, when the wind comes hard from the west, \
the flash seems to come a little late, as if someone were still up there winding the clock by \
hand, counting under his breath, and making sure that every ship out on the dark water can find \
its way home before the morning.
"""
